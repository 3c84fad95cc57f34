"""What qconvert's grids support, stated once and importable without torch (the command line's help
texts are built from it, and `qconvert --help` must not pay for importing torch)."""

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
GRID_NAMES = ("int", "nf4", "iq4nl", "mxfp4", "nvfp4", "mxfp8", "fp8", "fp8-block")  # quantizers/grids.py defines each
ACTIVATION_SCHEMES = ("int8-dynamic", "int8-static", "fp8-dynamic")  # quantizers/activations.py defines each


def smooth_problem(value) -> str | None:
    """Why `value` is not a SmoothQuant strength (a number in [0, 1], or "auto"), or None."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value == "auto" or (number and 0 <= value <= 1):
        return None
    return f"{value} is not a strength in [0, 1] or auto"
