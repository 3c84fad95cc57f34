"""What vLLM's quantized kernels accept, shared by the checks of the formats vLLM reads (GPTQ and
compressed-tensors): bit widths, group sizes, and one scheme for the projections it fuses."""

from collections import defaultdict

from qconvert.formats.base import Problem

FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})  # qkv_proj and gate_up_proj in vLLM


def vllm_scheme_problems(module: str, bits, group, allowed_bits: tuple) -> list[Problem]:
    problems = []
    if bits not in allowed_bits:
        problems.append(
            Problem(module, f"vLLM's kernels take {' or '.join(map(str, allowed_bits))}-bit weights, not {bits}")
        )
    if group not in (0, 32, 64, 128):
        problems.append(Problem(module, f"vLLM's kernels take groups of 32, 64 or 128 (or per channel), not {group}"))
    return problems


def fused_problems(schemes: dict[str, tuple | None]) -> list[Problem]:
    """vLLM loads q/k/v (and gate/up) into one fused layer, which has one scheme: they must agree."""
    problems = []
    by_parent = defaultdict(dict)
    for module, scheme in schemes.items():
        parent, _, leaf = module.rpartition(".")
        by_parent[parent][leaf] = scheme
    for parent, leaves in sorted(by_parent.items()):
        for fused in FUSED:
            present = {leaf: leaves.get(leaf) for leaf in fused if leaf in leaves}
            if present and (len(set(present.values())) > 1 or len(present) < len(fused)):
                described = ", ".join(f"{leaf} {_describe(s)}" for leaf, s in sorted(present.items()))
                problems.append(
                    Problem(
                        parent,
                        f"vLLM fuses {'/'.join(sorted(fused))} into one layer with one scheme; "
                        f"here: {described}{' (others float)' if len(present) < len(fused) else ''}",
                    )
                )
    return problems


def _describe(scheme: tuple | None) -> str:
    if not scheme or scheme[0] is None:
        return "float"
    bits, group, symmetric, kind = scheme[:4]
    return f"{kind}{bits} {'g' + str(group) if group else 'per channel'}{'' if symmetric else ' asym'}"
