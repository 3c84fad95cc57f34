"""Helpers tests import (`from helpers import ...`): tiny checkpoints written from tensors or from
transformers model classes, and the paths of the repository and the shared data."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def tiny_tensors(dtype=torch.bfloat16, hidden=64, layers=2, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.embed_tokens.weight": torch.randn(128, hidden, generator=g).to(dtype),
        "model.norm.weight": torch.ones(hidden, dtype=dtype),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = (torch.randn(hidden, hidden, generator=g) * 0.05).to(dtype)
        t[p + "mlp.down_proj.weight"] = (torch.randn(hidden, 3 * hidden, generator=g) * 0.05).to(dtype)
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    return t


def make_tiny_lm(folder: Path, real_models: Path, layers: int = 2, hidden: int = 64) -> Path:
    """A random Llama with SmolLM2's real tokenizer, so real text tokenizes into its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_models / "smollm2-135m" / name, folder / name)
    return folder


def save_tiny(folder, config, model_class, tokenizer_from=None, biases=False):
    """A random-init model of `model_class` saved as a Hugging Face folder (seeded, so reproducible)."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    if biases:  # transformers initialises biases to zero, which would hide a bias in the wrong order
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


CALIBRATION_TEXT = " ".join(f"Line {i} of a calibration text about rivers, foxes and dogs." for i in range(200))


def first_block(source: Path, tmp_path: Path, config=None):
    """The first decoder block of `source` as a calibrated quantizer sees it, with a few calibration
    windows of a made-up text, its q/k/v/o and MLP weights selected (at `config`, default int3 g32)."""
    from qconvert.calibration.blocks import DecoderBlocks
    from qconvert.calibration.samples import CalibrationSettings, calibration_windows
    from qconvert.calibration.statistics import CalibrationBlock
    from qconvert.io.sources import open_checkpoint
    from qconvert.quantizers import QuantConfig

    (tmp_path / "calib.txt").write_text(CALIBRATION_TEXT)
    checkpoint = open_checkpoint(source)
    blocks = DecoderBlocks(checkpoint)
    settings = CalibrationSettings(text=str(tmp_path / "calib.txt"), samples=4, seqlen=32, batch_size=2)
    inputs = blocks.first_inputs(calibration_windows(checkpoint.folder, settings), settings.batch_size)
    module = blocks.load(0)
    names = [n for n in checkpoint.tensors if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    config = config or QuantConfig(bits=3, group_size=32)
    return CalibrationBlock(module, blocks.block_prefix(0), {n: config for n in names}, inputs)
