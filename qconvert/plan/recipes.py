"""Recipes: conversion settings kept in a TOML file under version control.

    # int4 in groups of 64, with the most sensitive projections at 6 bits
    [defaults]                # any of: quantizer, grid, bits, group_size, symmetric, scale_dtype, options
    bits = 4
    group_size = 64

    [calibration]             # for calibrated quantizers: text, dataset, samples, seqlen, seed, batch_size, dtype
    samples = 128

    [[rules]]                 # ordered; the first rule whose regex matches a tensor's name decides it
    match = 'mlp\\.down_proj'
    bits = 6

    [[rules]]
    match = 'embed_tokens'    # a rule may quantize tensors the default selection keeps
    bits = 8
    group_size = 0

    [[rules]]
    match = 'layers\\.0\\.'
    keep = true               # ... or keep them in float

Every error names the file, the line and the reason. A relative calibration `text` is relative to
the recipe's own folder.
"""

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qconvert.errors import SchemeError
from qconvert.limits import ACTIVATION_SCHEMES, SUPPORTED_BITS, smooth_problem
from qconvert.quantizers.base import SCALE_DTYPES
from qconvert.quantizers.grids import GRID_NAMES

SCHEME_KEYS = {
    "quantizer": str,
    "grid": str,
    "bits": int,
    "group_size": int,
    "symmetric": bool,
    "scale_dtype": str,
    "activations": str,
}
DEFAULT_KEYS = {**SCHEME_KEYS, "options": dict, "smooth": (float, int, str)}  # SmoothQuant: one α per conversion
CALIBRATION_KEYS = {
    "text": str,
    "dataset": str,
    "samples": int,
    "seqlen": int,
    "seed": int,
    "batch_size": int,
    "dtype": str,
}
RULE_KEYS = {"match": str, "keep": bool, **SCHEME_KEYS}
SECTIONS = {"defaults": DEFAULT_KEYS, "calibration": CALIBRATION_KEYS}


@dataclass(frozen=True)
class Rule:
    """One ordered rule: tensors whose name matches `pattern` are kept in float (`keep`) or quantized
    with the scheme keys in `overrides` replacing the defaults."""

    pattern: re.Pattern
    keep: bool
    overrides: dict[str, Any]
    label: str  # how the manifest names it, e.g. "rule 2 of int4-mixed.toml (line 14)"

    def describe(self) -> dict:
        return {"match": self.pattern.pattern, "keep": self.keep, **self.overrides, "label": self.label}


@dataclass(frozen=True)
class Recipe:
    path: Path
    sha256: str  # of the file's bytes: batch jobs compare it to decide whether an output is current
    defaults: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    rules: tuple[Rule, ...] = ()

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256}


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe.

    Raises:
        SchemeError: the file is missing, is not TOML, or has an unknown key, a wrong type, an
            impossible value or a bad regex; the message names the file and line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SchemeError(f"cannot read recipe {path}: {exc.strerror}.") from exc
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SchemeError(f"{path}: not valid TOML: {exc}.") from exc
    where = _Locator(path, text)
    for section in data:
        if section not in (*SECTIONS, "rules"):
            raise where.error(
                section,
                None,
                None,
                f"unknown section [{section}]; a recipe has [defaults], [calibration] and [[rules]]",
            )
    defaults = _checked_table(data.get("defaults", {}), DEFAULT_KEYS, where, "defaults", None)
    calibration = (
        _checked_table(data["calibration"], CALIBRATION_KEYS, where, "calibration", None)
        if "calibration" in data
        else None
    )
    if calibration and "text" in calibration and not Path(calibration["text"]).is_absolute():
        calibration["text"] = str((path.parent / calibration["text"]).resolve())
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise where.error("rules", None, None, "rules must be an array of tables, written [[rules]]")
    parsed = tuple(_rule(rule, index, where) for index, rule in enumerate(rules))
    return Recipe(
        path=path, sha256=hashlib.sha256(raw).hexdigest(), defaults=defaults, calibration=calibration, rules=parsed
    )


def _rule(rule: Any, index: int, where: "_Locator") -> Rule:
    if not isinstance(rule, dict):
        raise where.error("rules", index, None, "each rule must be a table")
    checked = _checked_table(rule, RULE_KEYS, where, "rules", index)
    if "match" not in checked:
        raise where.error("rules", index, None, f"rule {index + 1} has no `match` regex")
    try:
        pattern = re.compile(checked.pop("match"))
    except re.error as exc:
        raise where.error("rules", index, "match", f"`match` is not a valid regular expression: {exc}") from exc
    keep = checked.pop("keep", False)
    if keep and checked:
        raise where.error(
            "rules",
            index,
            next(iter(checked)),
            "a rule with keep = true keeps tensors in float and takes no scheme keys",
        )
    label = f"rule {index + 1} of {where.path.name} (line {where.line('rules', index, None)})"
    return Rule(pattern=pattern, keep=keep, overrides=checked, label=label)


def _checked_table(table: Any, keys: dict[str, type], where: "_Locator", section: str, index: int | None) -> dict:
    if not isinstance(table, dict):
        raise where.error(section, index, None, f"[{section}] must be a table")
    for key, value in table.items():
        if key not in keys:
            raise where.error(section, index, key, f"unknown key `{key}`; known keys here: {', '.join(keys)}")
        expected = keys[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise where.error(section, index, key, f"`{key}` must be {_type_name(expected)}, not {value!r}")
        problem = _impossible(key, value)
        if problem:
            raise where.error(section, index, key, problem)
    return dict(table)


def _impossible(key: str, value: Any) -> str | None:
    from qconvert.quantizers import registry

    if key == "bits" and value not in SUPPORTED_BITS:
        return f"bits = {value} is not supported; choose one of {list(SUPPORTED_BITS)}"
    if key == "group_size" and value < 0:
        return "group_size must be 0 (one scale per output channel) or positive"
    if key == "scale_dtype" and value not in SCALE_DTYPES:
        return f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}"
    if key == "activations" and value not in ACTIVATION_SCHEMES:
        return f"no activation scheme {value!r}; choose one of {', '.join(ACTIVATION_SCHEMES)}"
    if key == "smooth" and smooth_problem(value):
        return f"smooth = {smooth_problem(value)}"
    if key == "grid" and value not in GRID_NAMES:
        return f"no grid named {value!r}; choose one of {', '.join(GRID_NAMES)}"
    if key == "quantizer" and value not in registry.available():
        return f"no quantizer named {value!r}; installed: {', '.join(registry.available())}"
    if key in ("samples", "seqlen", "batch_size") and value <= 0:
        return f"{key} must be positive"
    return None


def _type_name(kind: type) -> str:
    names = {
        str: "a string",
        int: "an integer",
        bool: "true or false",
        dict: "a table",
        (float, int, str): "a number or a string",
    }
    return names[kind]


class _Locator:
    """Finds the line of a key in the recipe's text (tomllib reports no positions for valid TOML)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line(self, section: str, index: int | None, key: str | None) -> int:
        current, count, header_line = None, -1, 1
        for number, raw in enumerate(self.lines, 1):
            stripped = raw.strip()
            header = re.fullmatch(r"\[\[?\s*([\w.]+)\s*\]\]?(\s*#.*)?", stripped)
            if header:
                current = header.group(1)
                if current == section:
                    count += 1 if stripped.startswith("[[") else 0
                    if index is None or count == index:
                        header_line = number
                        if key is None:
                            return number
                continue
            in_place = current == section and (index is None or count == index)
            if in_place and key is not None and re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", raw):
                return number
            if current is None and key == section and re.match(rf"\s*{re.escape(section)}\s*=", raw):
                return number
        return header_line

    def error(self, section: str, index: int | None, key: str | None, reason: str) -> SchemeError:
        return SchemeError(f"{self.path}, line {self.line(section, index, key)}: {reason}.")
