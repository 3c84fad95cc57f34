"""Ray stays optional: only `qconvert/cluster.py` imports it, and without it `--cluster` is refused in one sentence."""

import re
import sys
from pathlib import Path

from typer.testing import CliRunner

from qconvert.cli import app

PACKAGE = Path(__file__).resolve().parent.parent / "qconvert"


def test_only_the_cluster_module_imports_ray():
    importers = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if re.search(r"^\s*(import ray|from ray\b)", p.read_text(), re.MULTILINE)
    ]
    assert importers == ["cluster.py"]


def test_without_ray_cluster_flags_are_refused_in_one_sentence(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[jobs]]\nsource = "{tiny_llama}"\nsettings = {{ bits = 4 }}\n')
    for args in (
        ["batch", str(jobs), "--cluster", "auto"],
        ["model", str(tiny_llama), "-o", str(tmp_path / "o"), "--cluster", "local"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "pip install 'qconvert[cluster]'" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
