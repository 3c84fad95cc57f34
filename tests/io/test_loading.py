import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_tensors, write_checkpoint
from safetensors.torch import save_file

from qconvert.errors import SourceError
from qconvert.io.sources import open_checkpoint


def read_all(checkpoint):
    return dict(checkpoint.iter_tensors(list(checkpoint.tensors)))


def test_single_folder(tiny_checkpoint):
    checkpoint = open_checkpoint(tiny_checkpoint)
    assert set(checkpoint.tensors) == set(tiny_tensors())
    assert checkpoint.tensors["model.norm.weight"].dtype == torch.bfloat16
    assert checkpoint.config == {"model_type": "llama"}
    for name, tensor in read_all(checkpoint).items():
        assert torch.equal(tensor, tiny_tensors()[name])


def test_sharded_safetensors_with_index(tmp_path):
    tensors = tiny_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    weight_map = {n: f for f, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = open_checkpoint(tmp_path)
    assert len(checkpoint.files) == 2
    assert all(torch.equal(t, tensors[n]) for n, t in read_all(checkpoint).items())


def test_pytorch_bin_shards_load_weights_only(tmp_path):
    tensors = tiny_tensors()
    names = sorted(tensors)
    torch.save({n: tensors[n] for n in names[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({n: tensors[n] for n in names[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 if i < 2 else 2}-of-00002.bin" for i, n in enumerate(names)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert all(torch.equal(t, tensors[n]) for n, t in read_all(open_checkpoint(tmp_path)).items())


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_with_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2, 2), "evil": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(SourceError, match="safely"):
        open_checkpoint(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_single_safetensors_file(tmp_path):
    save_file(tiny_tensors(), tmp_path / "weights.safetensors")
    checkpoint = open_checkpoint(tmp_path / "weights.safetensors")
    assert checkpoint.folder is None and len(checkpoint.tensors) == len(tiny_tensors())


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path):
    # Lay out a Hugging Face cache exactly as huggingface_hub writes it.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / commit
    write_checkpoint(snapshot, tiny_tensors(), config={"model_type": "llama"})
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from qconvert.io.sources import open_checkpoint; c = open_checkpoint('acme/tiny'); "
        "print(c.hub_id, c.revision, len(c.tensors))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["acme/tiny", commit, str(len(tiny_tensors()))]


def test_uncached_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceError, match="not in the Hugging Face cache"):
        open_checkpoint("acme/absent")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors_is_a_source_error(tiny_checkpoint, damage):
    path = tiny_checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 16 + data[16:])
    with pytest.raises(SourceError, match="truncated|corrupt|not a valid"):
        checkpoint = open_checkpoint(tiny_checkpoint)
        read_all(checkpoint)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_checkpoint(tmp_path / "nothing")
    with pytest.raises(SourceError, match="no weights found"):
        open_checkpoint(tmp_path)
