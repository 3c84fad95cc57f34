"""The output format, pinned: a change to packing, layouts, the writer or the manifest shows here.

Regenerate with `python scripts/make_goldens.py` after an intentional change, and review the diff.
"""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_goldens.py"
spec = importlib.util.spec_from_file_location("make_goldens", SCRIPT)
make_goldens = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_goldens)


@pytest.mark.parametrize("name", list(make_goldens.CASES))
def test_output_matches_golden(name, tmp_path):
    manifest, content = make_goldens.make(name, tmp_path)
    golden = json.loads((make_goldens.GOLDEN / f"{name}.manifest.json").read_text())
    # Error figures are float sums whose last digits may vary with the CPU's vector width.
    errors = [t.pop("relative_mse") or 0.0 for t in manifest["tensors"]]
    golden_errors = [t.pop("relative_mse") or 0.0 for t in golden["tensors"]]
    assert errors == pytest.approx(golden_errors, rel=1e-4)
    assert manifest == golden
    assert content == (make_goldens.GOLDEN / f"{name}.safetensors-body").read_bytes()
