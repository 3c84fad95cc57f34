"""On-disk formats: one module per format, each holding everything qconvert knows about it.

| format               | layout (`model`) | reader (source) | exporter (`export`) | runtime check (`check`) |
|----------------------|------------------|-----------------|---------------------|-------------------------|
| `native.py`          | yes              | (`qconvert.load`) |                   |                         |
| `compressed_tensors.py` | yes           | yes             | yes                 | transformers, vLLM      |
| `gptq.py`            |                  | yes             | yes                 | transformers, vLLM      |
| `awq.py`             |                  | yes             |                     |                         |
| `mlx.py`             |                  |                 | yes                 | mlx_lm                  |
| `gguf.py`            |                  |                 | yes                 | llama.cpp               |

`registry.py` lists them; this module only names them, without importing torch, so the command
line can build its choices from these names cheaply. Bits are packed by `qconvert/packing.py`;
formats own the file layout around them.
"""

from enum import StrEnum


class Format(StrEnum):
    """Every on-disk format qconvert writes or reads, by the name users type."""

    NATIVE = "native"
    COMPRESSED_TENSORS = "compressed-tensors"
    GPTQ = "gptq"
    AWQ = "awq"
    MLX = "mlx"
    GGUF = "gguf"


LAYOUTS = (Format.COMPRESSED_TENSORS, Format.NATIVE)  # what `qconvert model` writes
LAYOUT_CHOICES = ("auto", *LAYOUTS)
EXPORTS = (Format.GGUF, Format.MLX, Format.GPTQ, Format.COMPRESSED_TENSORS)  # what `qconvert export` writes
# The formats that can say a layer's inputs are quantized too (W8A8's `input_activations`): a W8A8 model
# exported anywhere else would compute something else, so it is refused.
HOLDS_ACTIVATIONS = (Format.NATIVE, Format.COMPRESSED_TENSORS)
