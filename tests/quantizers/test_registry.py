import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qconvert.errors import SchemeError
from qconvert.quantizers import Quantizer, available, get, register
from qconvert.quantizers.registry import normalize_name
from qconvert.quantizers.rtn import RTNQuantizer

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "qconvert_toy.py"


def install_plugin(site: Path, entry_points: dict[str, str]) -> Path:
    """Install the toy plugin as a distribution (dist-info with entry points) under `site`."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(PLUGIN, site / "qconvert_toy.py")
    info = site / "qconvert_toy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qconvert-toy\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[qconvert.quantizers]\n{lines}\n")
    return site


def test_builtin_names_resolve():
    assert "rtn" in available()
    assert get("rtn") is RTNQuantizer
    assert get(" RTN ") is RTNQuantizer


def test_names_are_normalised():
    assert normalize_name("My-Quant ") == "my_quant"


def test_unknown_name_lists_what_exists():
    with pytest.raises(SchemeError, match="available: .*rtn"):
        get("nope")


def test_duplicate_and_non_quantizer_registrations_are_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register("rtn")
        class Other(Quantizer):
            def quantize(self, name, weight, stats=None): ...

    with pytest.raises(TypeError, match="not a Quantizer"):
        register("thing")(dict)


def test_entry_point_plugin_is_found_lazily_and_converts(tmp_path, monkeypatch, tiny_checkpoint):
    site = install_plugin(tmp_path / "site", {"pow2": "qconvert_toy:PowerOfTwoQuantizer"})
    monkeypatch.syspath_prepend(str(site))
    assert "pow2" in available()
    assert "qconvert_toy" not in sys.modules  # listed without importing it
    cls = get("pow2")
    assert cls.__name__ == "PowerOfTwoQuantizer"

    import qconvert

    result = qconvert.convert(
        tiny_checkpoint, tmp_path / "out", qconvert.Settings(quantizer="pow2", symmetric=True, layout="native")
    )
    record = next(t for t in result.manifest.tensors if t.action == "quantized")
    assert record.quantizer == "pow2"
    loaded = qconvert.load(result.output)
    scales = torch.log2(next(iter(v for k, v in _stored(result.output).items() if k.endswith(".scales"))).float())
    assert torch.equal(scales, scales.round())  # the plugin's own scales landed in the file
    original = qconvert.io.sources.open_checkpoint(tiny_checkpoint)
    name = record.name
    w = next(t for n, t in original.iter_tensors([name]))
    assert (loaded[name].float() - w.float()).abs().max() < 0.05


def _stored(output):
    from safetensors.torch import load_file

    return load_file(output / "model.safetensors")


def test_cli_lists_and_uses_a_plugin_and_survives_a_broken_one(tmp_path, tiny_checkpoint):
    site = install_plugin(
        tmp_path / "site",
        {
            "pow2": "qconvert_toy:PowerOfTwoQuantizer",
            "broken": "qconvert_toy:Broken",
            "missing": "no_such_module:Thing",
        },
    )
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "qconvert.cli", *args], capture_output=True, text=True, env=env)

    assert run("--help").returncode == 0
    listed = run("quantizers", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["pow2"]["class"] == "qconvert_toy.PowerOfTwoQuantizer"
    assert "not a qconvert Quantizer" in rows["broken"]["error"]
    assert "failed to load" in rows["missing"]["error"]
    converted = run("model", str(tiny_checkpoint), "-q", "pow2", "--symmetric", "-o", str(tmp_path / "out"), "--json")
    assert converted.returncode == 0, converted.stderr
    assert json.loads((tmp_path / "out" / "qconvert.json").read_text())["settings"]["quantizer"] == "pow2"
    failed = run("model", str(tiny_checkpoint), "-q", "broken", "-o", str(tmp_path / "out2"))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert not (tmp_path / "out2").exists()
