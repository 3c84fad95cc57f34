"""Quantizer classes: the base interface, the registry, and the built-in methods."""

from qconvert.quantizers import awq, clip, gptq, qat, rtn  # noqa: F401  (registers the built-in quantizers)
from qconvert.quantizers.base import QuantConfig, QuantizedTensor, Quantizer, dequantize
from qconvert.quantizers.registry import available, get, register

__all__ = ["QuantConfig", "QuantizedTensor", "Quantizer", "available", "dequantize", "get", "register"]
