"""Which tensors get quantized, with which scheme, and why: ordered rules, then the default rule.

Rules come from --exclude (keep in float), a recipe's [[rules]] and --include, in that order; the
first whose regex matches a tensor's name decides it. A tensor no rule matches falls to the default:
2-D float weights of linear layers inside the transformer blocks are quantized, everything else
(embeddings, norms, biases, the output head) is kept.

"Linear layer" means what the runtime builds, not what the name suggests: where transformers can
build the model, each tensor's role comes from its module in that model (`io/skeleton.py`), so a
GPT-2 Conv1D or an MoE router stored as a plain parameter stays in float, and no rule can make it
quantized (a layout could not hold it, and the runtime would load random weights in its place).
Without a config (a lone weights file) or an architecture transformers knows, names decide.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from qconvert.errors import SchemeError
from qconvert.io.loading import TensorInfo
from qconvert.io.skeleton import EMBEDDING, EXPERTS, LINEAR, QUANTIZABLE, UNUSED
from qconvert.manifest import BY_DEFAULT, BY_RUNTIME
from qconvert.plan.recipes import Rule

# A transformer block's tensors carry its index: model.layers.3., encoder.layer.0., h.11., blocks.2.
IN_BLOCK = re.compile(r"(^|\.)\d+\.")
NOT_LINEAR = re.compile(r"(embed|wte|wpe|norm|ln_|lm_head|\.bias$)", re.IGNORECASE)


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str  # for people
    by: str = BY_DEFAULT  # for tools: the deciding rule's label, or manifest.BY_DEFAULT / BY_RUNTIME
    overrides: dict[str, Any] = field(default_factory=dict)  # scheme keys the deciding rule sets


def command_line_rules(include: Sequence[str], exclude: Sequence[str], recipe_rules: Sequence[Rule] = ()) -> list[Rule]:
    """--exclude first (it beats everything), then the recipe's rules, then --include."""
    excluded = [Rule(_compile(p, "--exclude"), True, {}, f"--exclude {p}") for p in exclude]
    included = [Rule(_compile(p, "--include"), False, {}, f"--include {p}") for p in include]
    return [*excluded, *recipe_rules, *included]


def _compile(pattern: str, option: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise SchemeError(f"{option} {pattern!r} is not a valid regular expression: {exc}.") from exc


def decide(info: TensorInfo, rules: Sequence[Rule], role: str | None = None) -> Decision:
    """Decide for one tensor: the first matching rule, else the default rule.

    `role` is the tensor's role in the model the runtime builds (`io/skeleton.py`), or None when
    unknown (then names decide).
    """
    is_float_matrix = len(info.shape) == 2 and info.dtype.is_floating_point and info.numel > 0
    for rule in rules:
        if rule.pattern.search(info.name):
            if rule.keep:
                verb = "excluded by" if rule.label.startswith("--") else "kept in float by"
                return Decision(False, f"{verb} {rule.label}", rule.label)
            if not is_float_matrix:
                return Decision(False, f"matches {rule.label} but is not a non-empty 2-D float matrix", rule.label)
            if role is not None and role not in QUANTIZABLE:
                return Decision(False, f"matches {rule.label} but {_role_reason(role)}", BY_RUNTIME)
            verb = "included by" if rule.label.startswith("--") else "quantized by"
            return Decision(True, f"{verb} {rule.label}", rule.label, dict(rule.overrides))
    if len(info.shape) != 2:
        return Decision(False, f"{len(info.shape)}-D tensor (norm, bias or buffer)")
    if not info.dtype.is_floating_point:
        return Decision(False, f"{info.dtype} tensor, not a float weight")
    if info.numel == 0:
        return Decision(False, "empty tensor (a dimension of size 0)")
    if role is not None and role not in (LINEAR, EXPERTS):
        return Decision(False, "embedding" if role == EMBEDDING else _role_reason(role))
    if NOT_LINEAR.search(info.name):
        return Decision(False, "embedding, norm or output head")
    if not IN_BLOCK.search(info.name) or not info.name.endswith(".weight"):
        return Decision(False, "outside the transformer blocks")
    if role == EXPERTS:
        return Decision(True, "an expert's linear weight inside a transformer block")
    return Decision(True, "linear weight inside a transformer block")


def _role_reason(role: str) -> str:
    if role == UNUSED:
        return "the model transformers builds has no parameter for it"
    return f"transformers builds it as a {role}, not a linear layer, so no layout can hold it quantized"
