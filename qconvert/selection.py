"""Which tensors get quantized, and why: the default rule plus --include / --exclude regexes."""

import re
from dataclasses import dataclass

from qconvert.errors import SchemeError
from qconvert.io.loading import TensorInfo

# A transformer block's tensors carry its index: model.layers.3., encoder.layer.0., h.11., blocks.2.
IN_BLOCK = re.compile(r"(^|\.)\d+\.")
NOT_LINEAR = re.compile(r"(embed|wte|wpe|norm|ln_|lm_head|\.bias$)", re.IGNORECASE)


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str


def compile_patterns(patterns: list[str], option: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise SchemeError(f"{option} {pattern!r} is not a valid regular expression: {exc}.") from exc
    return compiled


def decide(info: TensorInfo, include: list[re.Pattern], exclude: list[re.Pattern]) -> Decision:
    """Decide for one tensor; --exclude beats --include, which adds to the default rule."""
    for pattern in exclude:
        if pattern.search(info.name):
            return Decision(False, f"excluded by --exclude {pattern.pattern}")
    is_matrix = len(info.shape) == 2
    for pattern in include:
        if pattern.search(info.name):
            if not is_matrix:
                return Decision(False, f"matches --include {pattern.pattern} but is not a 2-D matrix")
            return Decision(True, f"included by --include {pattern.pattern}")
    if not is_matrix:
        return Decision(False, f"{len(info.shape)}-D tensor (norm, bias or buffer)")
    if not info.dtype.is_floating_point:
        return Decision(False, f"{info.dtype} tensor, not a float weight")
    if NOT_LINEAR.search(info.name):
        return Decision(False, "embedding, norm or output head")
    if not IN_BLOCK.search(info.name) or not info.name.endswith(".weight"):
        return Decision(False, "outside the transformer blocks")
    return Decision(True, "linear weight inside a transformer block")
