"""qconvert: turn a Hugging Face checkpoint into a compact quantized model.

import qconvert
result = qconvert.convert("path/to/checkpoint", "out/", qconvert.Settings(bits=4, group_size=64))
state_dict = qconvert.load("out/")        # dequantized tensors
model = qconvert.load_model("out/")       # a transformers model (needs transformers)
"""

__version__ = "0.1.0"
__all__ = ["ConversionResult", "Settings", "__version__", "convert", "load", "load_model"]

_LAZY = {
    "ConversionResult": "qconvert.conversion",
    "Settings": "qconvert.settings",
    "convert": "qconvert.conversion",
    "load": "qconvert.output",
    "load_model": "qconvert.output",
}


def __getattr__(name: str):
    # Imported on first use, so `qconvert --help` does not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qconvert' has no attribute {name!r}")
