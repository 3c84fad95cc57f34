"""A third-party quantizer package, as someone outside this repo would write it.

The tests install it into a temporary site folder with an entry point in the
`qconvert.quantizers` group; qconvert must find and use it without any import from us.
"""

import torch

from qconvert.quantizers import QuantizedTensor, Quantizer


class PowerOfTwoQuantizer(Quantizer):
    """Symmetric round-to-nearest with scales rounded up to a power of two (shift-only dequant)."""

    description = "symmetric RTN with power-of-two scales (test plugin)"

    def quantize(self, name, weight, stats=None):
        rows, columns = weight.shape
        size = self.config.group_size_for(columns)
        groups = self.config.groups_for(columns)
        w = torch.nn.functional.pad(weight.float(), (0, groups * size - columns)).view(rows, groups, size)
        half = 2 ** (self.config.bits - 1)
        scales = torch.exp2(torch.ceil(torch.log2(w.abs().amax(-1).clamp(min=1e-8) / (half - 1))))
        codes = (w / scales.unsqueeze(-1)).round().clamp(-half, half - 1) + half
        return QuantizedTensor(
            codes=codes.view(rows, -1)[:, :columns].to(torch.uint8),
            scales=scales.to(torch.float16),
            zeros=None,
            bits=self.config.bits,
            group_size=size,
            shape=(rows, columns),
            dtype=weight.dtype,
        )


class Broken:
    """Not a Quantizer: the registry must refuse it with a clear message."""
