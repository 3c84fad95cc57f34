"""qconvert: turn a Hugging Face checkpoint into a compact quantized model."""

__version__ = "0.1.0"

from qconvert.conversion import ConversionResult, Settings, convert  # noqa: E402
from qconvert.output import load, load_model  # noqa: E402

__all__ = ["ConversionResult", "Settings", "__version__", "convert", "load", "load_model"]
