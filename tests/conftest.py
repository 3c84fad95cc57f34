"""Shared fixtures: tiny synthetic checkpoints for speed, and the real sample models."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        import json

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


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "tiny", tiny_tensors(), config={"model_type": "llama"})


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A real (random-weight) transformers Llama checkpoint, small enough to run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def real_models() -> Path:
    """The sample checkpoints made by scripts/prepare_models.py (made on first use)."""
    folder = Path(os.environ.get("QCONVERT_MODELS", REPO / "models"))
    if not ((folder / "smollm2-135m" / "model.safetensors").is_file() and (folder / "all-minilm-l6-v2").is_dir()):
        subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_models.py"), str(folder)], check=True)
    return folder


@pytest.fixture(scope="session")
def eval_text() -> str:
    path = SHARED_DATA / "eval.txt"
    if not path.is_file():
        pytest.skip(f"{path} is missing (see shared/DATA.md)")
    return path.read_text()


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


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, real_models) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), real_models)
