"""`qconvert batch`: runs, skips current outputs, keeps going (or not), resumes after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from qconvert.cli import app

runner = CliRunner()


def jobs_file(tmp_path: Path, source: Path, *extra_jobs: str) -> Path:
    (tmp_path / "int4.toml").write_text("# int4\n[defaults]\nbits = 4\ngroup_size = 32\n")
    (tmp_path / "int8.toml").write_text("# int8\n[defaults]\nbits = 8\ngroup_size = 0\nsymmetric = true\n")
    text = f'[defaults]\noutput_dir = "out"\n\n[matrix]\nsources = ["{source}"]\nrecipes = ["int4.toml", "int8.toml"]\n'
    path = tmp_path / "jobs.toml"
    path.write_text(text + "".join(extra_jobs))
    return path


def report(path: Path) -> list[dict]:
    return json.loads(path.with_name(f"{path.stem}-report.json").read_text())["jobs"]


def test_batch_converts_then_skips_current_outputs_then_force_redoes_them(tmp_path, tiny_llama):
    path = jobs_file(tmp_path, tiny_llama)
    first = runner.invoke(app, ["batch", str(path)])
    assert first.exit_code == 0, first.output
    rows = report(path)
    assert [r["status"] for r in rows] == ["converted", "converted"]
    assert rows[0]["output"].endswith("out/tiny-llama0-int4") or rows[0]["output"].endswith("-int4")
    assert rows[0]["peak_rss_bytes"] > 50e6 and rows[0]["seconds"] > 0 and rows[0]["size_bytes"] > 0
    assert rows[1]["quantized_bits_per_weight"] > rows[0]["quantized_bits_per_weight"]

    again = runner.invoke(app, ["batch", str(path), "--json"])
    assert again.exit_code == 0, again.output
    assert [r["status"] for r in json.loads(again.stdout)] == ["skipped", "skipped"]

    (tmp_path / "int8.toml").write_text("# int8, changed\n[defaults]\nbits = 8\ngroup_size = 0\nsymmetric = false\n")
    changed = runner.invoke(app, ["batch", str(path), "--json"])
    assert [r["status"] for r in json.loads(changed.stdout)] == ["skipped", "converted"]

    forced = runner.invoke(app, ["batch", str(path), "--force", "--json"])
    assert [r["status"] for r in json.loads(forced.stdout)] == ["converted", "converted"]


def test_a_failed_job_stops_the_batch_unless_keep_going(tmp_path, tiny_llama):
    bad = f'\n[[jobs]]\nsource = "{tmp_path / "missing"}"\nrecipe = "int4.toml"\n'
    path = tmp_path / "jobs.toml"
    jobs_file(tmp_path, tiny_llama)
    # the failing job first, then the matrix
    path.write_text(
        '[defaults]\noutput_dir = "out"\n' + bad + f'\n[matrix]\nsources = ["{tiny_llama}"]\nrecipes = ["int4.toml"]\n'
    )
    stopped = runner.invoke(app, ["batch", str(path)])
    assert stopped.exit_code == 5
    rows = report(path)
    assert [r["status"] for r in rows] == ["failed", "not run"]
    assert "does not exist" in rows[0]["error"] and rows[0]["exit_code"] == 2

    going = runner.invoke(app, ["batch", str(path), "--keep-going"])
    assert going.exit_code == 5
    assert [r["status"] for r in report(path)] == ["failed", "converted"]


def test_bad_batch_files_are_refused(tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text('[[jobs]]\nsource = "x"\nrecipe = "a.toml"\nsettings = { bits = 4 }\n')
    result = runner.invoke(app, ["batch", str(path)])
    assert result.exit_code == 2 and "job 1: give a `recipe` or `settings`, not both" in result.stderr
    path.write_text('[[jobs]]\nsource = "x"\nsettings = { bitz = 4 }\n')
    result = runner.invoke(app, ["batch", str(path)])
    assert result.exit_code == 2 and "unknown setting `bitz`" in result.stderr


def test_a_batch_killed_midway_resumes_where_it_stopped(tmp_path, real_models):
    # SmolLM2, not the tiny model: its jobs take long enough (~1 s) to be caught writing, every time.
    path = jobs_file(tmp_path, real_models / "smollm2-135m")
    process = subprocess.Popen(
        [sys.executable, "-m", "qconvert.cli", "batch", str(path)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    # Kill the whole batch (and its running job) once the second job is writing its output.
    while not any(p.name.endswith("int8.qconvert-partial") for p in out.glob(".*")) and time.monotonic() < deadline:
        assert process.poll() is None, "the batch finished before it could be interrupted"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert [r["status"] for r in report(path)] == ["converted", "pending"]
    assert not any(p.name.endswith("-int8") for p in out.iterdir())

    resumed = runner.invoke(app, ["batch", str(path), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["status"] for r in json.loads(resumed.stdout)] == ["skipped", "converted"]
    assert not any(p.name.endswith(".qconvert-partial") for p in out.iterdir())


def test_an_output_that_looks_like_a_hub_id_is_still_a_folder_beside_the_batch_file(tmp_path, tiny_llama):
    from qconvert.batch import load_jobs

    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[jobs]]\nsource = "{tiny_llama}"\noutput = "out/int4"\nsettings = {{ bits = 4 }}\n')
    assert load_jobs(jobs)[0].output == tmp_path / "out" / "int4"  # not "out/int4" under the working folder
