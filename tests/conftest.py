"""Shared fixtures: tiny synthetic checkpoints for speed, and the real sample models."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import REPO, SHARED_DATA, make_tiny_lm, tiny_tensors, write_checkpoint

# The answers qconvert keeps between runs (`io/memo.py`) start empty for every test session, here and in
# the commands the tests run, so no test passes on an answer an earlier run left behind.
os.environ["QCONVERT_CACHE"] = tempfile.mkdtemp(prefix="qconvert-test-memo-")


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


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, real_models) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), real_models)
