"""What CI jobs rely on: the plan's predictions, the events stream, exit codes, and JSON on stdout."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qconvert.cli import app
from qconvert.plan import prediction

runner = CliRunner()


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--bits", "4"], ["--recipe", "configs/mixed-q4km.toml"]])
def test_plan_predicts_the_measured_size_exactly_and_the_peak_memory_roughly(tmp_path, real_models, options):
    source = real_models / "smollm2-135m"
    planned = runner.invoke(app, ["plan", str(source), *options, "--json"])
    assert planned.exit_code == 0, planned.output
    predicted = json.loads(planned.stdout)["prediction"]
    result = subprocess.run(
        [sys.executable, "-m", "qconvert.cli", "model", str(source), *options, "-o", str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    peak = json.loads(result.stdout)["peak_rss_bytes"]  # VmHWM: wait4's figure counts this pytest process too
    assert predicted["weights_bytes"] == json.loads(result.stdout)["stored_bytes"]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    assert abs(predicted["output_bytes"] - on_disk) < 0.01 * on_disk
    # The plan counts transformers' memory whenever it may be imported (a recalled check never imports it).
    assert 0.7 * peak <= predicted["peak_rss_bytes"] <= 1.8 * peak, (predicted["peak_rss_bytes"], peak)


def test_model_refuses_to_start_when_the_plan_does_not_fit(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(prediction, "available_memory", lambda: 10_000_000)
    result = runner.invoke(app, ["model", str(tiny_llama), "-o", str(tmp_path / "out")])
    assert result.exit_code == 6
    assert "not starting: it needs about" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "out").exists()
    forced = runner.invoke(app, ["model", str(tiny_llama), "-o", str(tmp_path / "out"), "--force"])
    assert forced.exit_code == 0, forced.output


def test_events_stream_every_tensor_and_the_end(tmp_path, tiny_llama):
    events = tmp_path / "events.jsonl"
    result = runner.invoke(
        app, ["model", str(tiny_llama), "-o", str(tmp_path / "out"), "--events", str(events), "--json"]
    )
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # stdout is exactly the JSON summary
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "done"
    tensors = [e for e in lines if e["event"] == "tensor"]
    assert [e["index"] for e in tensors] == list(range(1, len(tensors) + 1)) and tensors[-1]["total"] == len(tensors)
    assert tensors[-1]["bytes_done"] == tensors[-1]["bytes_total"]
    assert all(e["rss_bytes"] > 0 and "elapsed_s" in e for e in lines)
    assert any(e["action"] == "quantized" and e["relative_mse"] > 0 and e["bits"] == 4 for e in tensors)


def test_events_record_a_failure_with_its_exit_code(tmp_path, tiny_llama):
    events = tmp_path / "events.jsonl"
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["model", str(tiny_llama), "-o", str(tmp_path / "out"), "--events", str(events)])
    assert result.exit_code == 2
    last = json.loads(events.read_text().splitlines()[-1])
    assert last["event"] == "error" and last["exit_code"] == 2 and "already exists" in last["message"]


def test_verify_gates_bits_per_weight_and_size(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert runner.invoke(app, ["model", str(tiny_llama), "-o", str(out), "--group-size", "32"]).exit_code == 0
    assert runner.invoke(app, ["verify", str(out), "--max-bpw", "4.7"]).exit_code == 0
    failed = runner.invoke(app, ["verify", str(out), "--max-bpw", "4.5", "--json"])
    assert failed.exit_code == 4 and "bits per quantized weight is above the 4.5 allowed" in failed.stderr
    assert json.loads(failed.stdout)["ok"] is False
    assert runner.invoke(app, ["verify", str(out), "--max-size", "1KB"]).exit_code == 4


@pytest.mark.parametrize(
    "command",
    [
        ["quantizers"],
        ["recipe", "check", "configs/int4-g64.toml"],
        ["plan", "{model}"],
        ["inspect", "{model}"],
        ["verify", "{out}"],
    ],
)
def test_every_command_prints_clean_json(tmp_path, tiny_llama, command):
    out = tmp_path / "out"
    assert runner.invoke(app, ["model", str(tiny_llama), "-o", str(out)]).exit_code == 0
    args = [part.format(model=tiny_llama, out=out) for part in command]
    result = runner.invoke(app, [*args, "--json"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    assert "\x1b[" not in result.stdout
