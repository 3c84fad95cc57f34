"""Quantization-aware training: the fake-quantized layer computes exactly what the converted one does,
gradients reach weights, scales and zero points, training lowers the loss, and bad settings are refused."""

import pytest
import torch
from helpers import make_tiny_lm

from qconvert import Settings, convert
from qconvert.calibration.samples import CalibrationSettings
from qconvert.errors import SchemeError
from qconvert.manifest import read_manifest
from qconvert.quantizers import QuantConfig, dequantize
from qconvert.quantizers.gptq import gptq_quantize
from qconvert.quantizers.qat import QATQuantizer, prepare
from qconvert.quantizers.qat import convert as convert_fake
from qconvert.quantizers.rtn import rtn_quantize

CONFIGS = [
    QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    for bits, group in ((2, 32), (3, 64), (4, 100), (5, 0), (8, 32))  # 100: a partial last group of 200
    for symmetric in (False, True)
]


@pytest.fixture(autouse=True)
def gradients_on():
    # Other test modules turn gradients off for the whole process when they are imported.
    with torch.enable_grad():
        yield


def two_layers(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(200, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))


def train(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, lr: float = 1e-3) -> list[float]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def name_of(config: QuantConfig) -> str:
    return f"int{config.bits}-g{config.group_size}-{'sym' if config.symmetric else 'asym'}"


@pytest.mark.parametrize("config", CONFIGS, ids=name_of)
def test_the_trained_layer_computes_exactly_what_the_converted_one_does(config):
    model = two_layers()
    x = torch.randn(6, 200)
    prepare(model, {"0.weight": config, "2.weight": config})
    train(model, x, torch.randn(6, 16), steps=10)
    with torch.no_grad():
        trained = model(x)
        fake_weight = model[0].weight.clone()
    quantized = convert_fake(model)
    assert set(quantized) == {"0.weight", "2.weight"}
    assert torch.equal(dequantize(quantized["0.weight"]), fake_weight)
    with torch.no_grad():
        assert torch.equal(model(x), trained)  # bit for bit: the file holds what was trained
    q = quantized["0.weight"]
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**config.bits
    assert q.scales.dtype == torch.float16 and (q.zeros is None) == config.symmetric
    assert not model[0].weight.requires_grad and not model[2].weight.requires_grad  # plain weights again


@pytest.mark.parametrize("config", CONFIGS[:4], ids=name_of)
def test_prepare_starts_exactly_at_the_given_codes(config):
    weight = torch.randn(48, 200) * 0.05
    hessian = torch.eye(200) + 0.1
    for start in (rtn_quantize("w", weight, config), gptq_quantize(weight, hessian, config)):
        linear = torch.nn.Linear(200, 48, bias=False)
        linear.weight.data = weight.clone()
        prepare(linear, {"weight": config}, {"weight": start})
        # The float weight stays inside its code's cell, off the values (where STE gives scales no gradient)
        assert not torch.equal(linear.parametrizations.weight.original, dequantize(start))
        back = convert_fake(linear)["weight"]
        assert torch.equal(back.codes, start.codes) and torch.equal(back.scales, start.scales)
        assert (back.zeros is None and start.zeros is None) or torch.equal(back.zeros, start.zeros)


def test_gradients_reach_weights_scales_and_zero_points():
    model = two_layers()
    config = QuantConfig(bits=3, group_size=32)
    fakes = prepare(model, {"0.weight": config}, None)
    # Inside the grid a zero point's shift cancels in (q - z)·s, so only clamped weights move it (LSQ+):
    # push some weights past the grid's ends.
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(1.5)
    loss = model(torch.randn(6, 200)).square().mean()
    loss.backward()
    fake = fakes["0.weight"]
    for name, grad in (
        ("weight", model[0].parametrizations.weight.original.grad),
        ("scale", fake.scale.grad),
        ("zero point", fake.zero.grad),
    ):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_training_lowers_a_tiny_models_loss_against_its_float_self():
    teacher = two_layers(seed=1)
    x = torch.randn(64, 200)
    with torch.no_grad():
        target = teacher(x)
    student = two_layers(seed=1)
    config = QuantConfig(bits=2, group_size=32)
    prepare(student, {"0.weight": config, "2.weight": config})
    losses = train(student, x, target, steps=150, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_refuses_what_it_cannot_train():
    with pytest.raises(SchemeError, match="integer weight grids only"):
        prepare(two_layers(), {"0.weight": QuantConfig(bits=4, grid="nf4", symmetric=True)})
    with pytest.raises(SchemeError, match="not the weight of a linear"):
        prepare(two_layers(), {"1.weight": QuantConfig()})
    with pytest.raises(SchemeError, match="gptq, clip or rtn"):
        QATQuantizer(QuantConfig(), start="awq")
    with pytest.raises(SchemeError, match="takes no option"):
        QATQuantizer(QuantConfig(), momentum=0.9)


def test_qat_converts_a_model_block_by_block_and_records_its_training(tmp_path, real_models):
    source = make_tiny_lm(tmp_path / "tiny", real_models, layers=2, hidden=64)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Line {i} of a text about rivers, foxes and dogs." for i in range(300)))
    calibration = CalibrationSettings(text=str(text), samples=8, seqlen=64, batch_size=2)
    options = {"epochs": 3, "lr": 1e-3, "start": "rtn"}  # the tiny random model: gptq's start is hard to beat
    settings = Settings(quantizer="qat", bits=2, group_size=32, calibration=calibration, options=options)
    out = convert(source, tmp_path / "out", settings).output  # the runtime check loads it with transformers
    manifest = read_manifest(out)
    blocks = manifest.training["blocks"]
    assert [b["block"] for b in blocks] == [0, 1]
    for record in blocks:
        assert record["steps"] == 3 * 4 and len(record["loss_epochs"]) == 3
        if record["kept"] == "trained":
            assert record["loss_end"] < record["loss_start"]
        else:
            assert record["loss_end"] == record["loss_start"]
    assert any(b["kept"] == "trained" for b in blocks)
    assert manifest.settings["options"] == options
    assert manifest.settings["calibration"]["text_sha256"]
    quantized = [t for t in manifest.tensors if t.action == "quantized"]
    assert len(quantized) == 2 * 7 and all(t.quantizer == "qat" and t.bits == 2 for t in quantized)
    assert all(t.relative_mse > 0.01 for t in quantized)  # against the source's weights, not the trained ones


def test_no_epochs_is_exactly_gptq_and_a_block_kept_in_float_is_skipped(tmp_path, real_models):
    from safetensors.torch import load_file

    source = make_tiny_lm(tmp_path / "tiny", real_models, layers=2, hidden=64)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Line {i} of a text about rivers, foxes and dogs." for i in range(300)))
    calibration = CalibrationSettings(text=str(text), samples=8, seqlen=64, batch_size=2)
    common = dict(bits=3, group_size=32, calibration=calibration, exclude=(r"layers\.1\.",))
    # qat starts from gptq's codes for each linear from the block's own inputs, in float32
    start = dict(quantizer="gptq", options={"sequential": False})
    gptq = convert(source, tmp_path / "gptq", Settings(**start, **common)).output
    qat = convert(source, tmp_path / "qat", Settings(quantizer="qat", options={"epochs": 0}, **common)).output
    assert load_file(gptq / "model.safetensors").keys() == load_file(qat / "model.safetensors").keys()
    for name, tensor in load_file(gptq / "model.safetensors").items():
        assert torch.equal(tensor, load_file(qat / "model.safetensors")[name]), name
    manifest = read_manifest(qat)
    assert [(b["block"], b["steps"], b["kept"]) for b in manifest.training["blocks"]] == [(0, 0, "start")]
    assert read_manifest(gptq).training is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epochs": "two"}, "epochs must be a whole number"),
        ({"epochs": 2.5}, "epochs must be a whole number"),
        ({"lr": -1.0}, "lr must be a finite learning rate"),
        ({"scale_lr": float("nan")}, "scale_lr must be a finite learning rate"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(SchemeError, match=message):
        QATQuantizer(QuantConfig(), **options)


def test_qat_refuses_table_grids_before_any_work(tmp_path, tiny_lm):
    text = tmp_path / "calib.txt"
    text.write_text("rivers and foxes " * 400)
    settings = Settings(
        quantizer="qat", grid="nf4", bits=4, symmetric=True, calibration=CalibrationSettings(text=str(text))
    )
    with pytest.raises(SchemeError, match="integer weight grids only"):
        convert(tiny_lm, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


def test_the_command_line_trains_or_refuses_in_one_sentence(tiny_checkpoint, tiny_lm, tmp_path):
    from typer.testing import CliRunner

    from qconvert.cli import app

    text = tmp_path / "calib.txt"
    text.write_text("rivers and foxes and dogs " * 300)
    common = ["--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "32", "--json"]
    runner = CliRunner()
    # Tensors that are not the blocks transformers builds for the config: no blocks to train.
    refused = runner.invoke(app, ["model", str(tiny_checkpoint), "-q", "qat", "-o", str(tmp_path / "a"), *common])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "blocks cannot be run" in refused.output and not (tmp_path / "a").exists()
    refused = runner.invoke(
        app, ["model", str(tiny_lm), "-q", "gptq", "--epochs", "2", "-o", str(tmp_path / "b"), *common]
    )
    assert refused.exit_code != 0 and "takes no option epochs" in refused.output
    done = runner.invoke(
        app,
        [
            "model",
            str(tiny_lm),
            "-q",
            "qat",
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--start",
            "clip",
            "-o",
            str(tmp_path / "c"),
        ]
        + common,
    )
    assert done.exit_code == 0, done.output
    manifest = read_manifest(tmp_path / "c")
    assert manifest.settings["options"] == {"epochs": 1, "lr": 1e-3, "start": "clip"}
    assert [b["steps"] for b in manifest.training["blocks"]] == [1, 1]
