"""Quantizer classes: the base interface, the registry, and the built-in methods."""

from qconvert.quantizers import clip, rtn  # noqa: F401  (registers "clip" and "rtn")
from qconvert.quantizers.base import QuantConfig, QuantizedTensor, Quantizer, dequantize
from qconvert.quantizers.registry import available, get, register

__all__ = ["QuantConfig", "QuantizedTensor", "Quantizer", "available", "dequantize", "get", "register"]
