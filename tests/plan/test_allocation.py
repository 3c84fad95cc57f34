"""--target-bpw / --target-size: the budget is met within 1%, and the choice is the optimal one."""

import itertools
import json

import pytest
from typer.testing import CliRunner

from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.errors import SchemeError
from qconvert.plan.allocation import _choose, _lower_hull, _Option
from qconvert.settings import Settings

runner = CliRunner()


@pytest.mark.parametrize("target", [2.6, 3.5, 4.0, 5.2, 7.0])
def test_target_bpw_is_met_within_one_percent_and_never_exceeded(tmp_path, tiny_llama, target):
    manifest = convert(tiny_llama, tmp_path / "out", Settings(group_size=32, target_bpw=target)).manifest
    achieved = manifest.totals["quantized_bits_per_weight"]
    assert target * 0.99 <= achieved <= target
    assert len({t.bits for t in manifest.tensors if t.action == "quantized"}) >= 1
    assert all("chosen by the size budget" in t.reason for t in manifest.tensors if t.action == "quantized")
    assert manifest.settings["target_bpw"] == target


def test_target_size_counts_the_whole_output(tmp_path, tiny_llama):
    plain = convert(tiny_llama, tmp_path / "int4", Settings(group_size=32)).manifest.totals["stored_bytes"]
    budget = int(plain * 0.9)
    result = runner.invoke(
        app,
        [
            "model",
            str(tiny_llama),
            "-o",
            str(tmp_path / "out"),
            "--group-size",
            "32",
            "--target-size",
            f"{budget}B",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    stored = json.loads(result.stdout)["stored_bytes"]
    assert budget * 0.99 <= stored <= budget


def test_an_unreachable_budget_is_refused(tmp_path, tiny_llama):
    with pytest.raises(SchemeError, match="out of reach: the selected tensors take"):
        convert(tiny_llama, tmp_path / "out", Settings(group_size=32, target_bpw=2.01))
    assert not (tmp_path / "out").exists()


def test_greedy_on_convex_hulls_matches_brute_force():
    # Three tensors with convex error curves: the greedy choice must be the best that fits.
    curves = {
        "a": [
            _Option((2, 32), 100, 50.0),
            _Option((3, 32), 150, 20.0),
            _Option((4, 32), 200, 8.0),
            _Option((8, 32), 400, 0.1),
        ],
        "b": [
            _Option((2, 32), 60, 9.0),
            _Option((3, 32), 90, 4.0),
            _Option((4, 32), 120, 2.0),
            _Option((8, 32), 240, 0.05),
        ],
        "c": [
            _Option((2, 32), 300, 400.0),
            _Option((3, 32), 450, 90.0),
            _Option((4, 32), 600, 30.0),
            _Option((8, 32), 1200, 1.0),
        ],
    }
    hulls = {name: _lower_hull(options) for name, options in curves.items()}
    for budget in (460, 600, 800, 1000, 1300, 1840):
        chosen = _choose(hulls, budget)
        spent = sum(next(o.bytes for o in curves[n] if o.candidate == b) for n, b in chosen.items())
        error = sum(next(o.error for o in curves[n] if o.candidate == b) for n, b in chosen.items())
        best = min(
            sum(o.error for o in combo)
            for combo in itertools.product(*curves.values())
            if sum(o.bytes for o in combo) <= budget
        )
        assert spent <= budget
        assert error <= best * 1.25  # greedy on hulls is optimal at hull vertices, close in between


def test_lower_hull_drops_dominated_and_concave_points():
    options = [
        _Option((2, 32), 100, 10.0),
        _Option((3, 32), 150, 9.5),
        _Option((4, 32), 200, 2.0),
        _Option((5, 32), 250, 2.5),
    ]
    assert [o.candidate[0] for o in _lower_hull(options)] == [2, 4]


def test_block_by_block_fisher_equals_the_whole_model_gradient(tmp_path, tiny_lm):
    """The streamed Fisher (one block at a time, window by window) is the squared per-window gradient of
    the whole model's loss, computed here the plain way with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from qconvert.calibration.fisher import loss_fisher
    from qconvert.calibration.samples import CalibrationSettings, calibration_windows
    from qconvert.io.sources import open_checkpoint

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Sentence {i} about rivers, foxes and the weather." for i in range(300)))
    calibration = CalibrationSettings(text=str(text), samples=3, seqlen=48)
    checkpoint = open_checkpoint(tiny_lm)
    names = [n for n in checkpoint.tensors if n.endswith("proj.weight")]
    streamed = dict(loss_fisher(checkpoint, names, calibration))
    assert set(streamed) == set(names)

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    parameters = dict(model.named_parameters())
    expected = {n: torch.zeros_like(parameters[n]) for n in names}
    for window in calibration_windows(tiny_lm, calibration):
        model.zero_grad()
        with torch.enable_grad():  # other test modules switch it off globally
            model(input_ids=window[None], labels=window[None]).loss.backward()
        for n in names:
            expected[n] += parameters[n].grad.square() / 3
    for n in names:
        torch.testing.assert_close(streamed[n], expected[n], rtol=1e-3, atol=1e-12)
    assert all(streamed[n].sum() > 0 for n in names)
    # the tied embedding is weighed by its use as the output head
    head = dict(loss_fisher(checkpoint, ["model.embed_tokens.weight"], calibration))["model.embed_tokens.weight"]
    assert head.shape == checkpoint.tensors["model.embed_tokens.weight"].shape and head.sum() > 0


def test_calibration_weighs_the_budget_by_the_loss(tmp_path, tiny_lm):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Sentence {i} about rivers, foxes and the weather." for i in range(300)))
    from qconvert.calibration.samples import CalibrationSettings

    calibration = CalibrationSettings(text=str(text), samples=2, seqlen=32)
    manifest = convert(
        tiny_lm, tmp_path / "out", Settings(group_size=32, target_bpw=3.5, calibration=calibration)
    ).manifest
    assert 3.5 * 0.99 <= manifest.totals["quantized_bits_per_weight"] <= 3.5


def test_a_budget_may_choose_table_grids(tmp_path, tiny_llama):
    settings = Settings(group_size=64, target_bpw=4.4, budget_grids=("nf4", "fp8"))
    manifest = convert(tiny_llama, tmp_path / "out", settings).manifest
    quantized = [t for t in manifest.tensors if t.action == "quantized"]
    assert manifest.totals["quantized_bits_per_weight"] <= 4.4
    # normal-shaped weights sit better on NF4's values than on int4's at fewer bits: some tensors take it
    assert "nf4" in {t.grid for t in quantized}
    assert any("nf4 g64 chosen by the size budget" in t.reason for t in quantized)
    assert manifest.layout == "native"  # compressed-tensors cannot hold nf4


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(budget_grids=("nf4",)), "add --target-bpw"),
        (dict(target_bpw=4.0, budget_grids=("int",)), "not int"),
        (dict(target_bpw=4.0, budget_grids=("nf5",)), "not nf5"),
    ],
)
def test_budget_grids_refusals(settings, words):
    with pytest.raises(SchemeError, match=words):
        Settings(**settings)
