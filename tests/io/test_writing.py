import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qconvert.errors import OutputError
from qconvert.io.dtypes import DTYPE_NAMES
from qconvert.io.writing import SafetensorsStreamWriter, TensorSpec, split_into_shards, staged_output


def test_streamed_file_reads_back_with_the_safetensors_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.uint8),
        "c": torch.tensor([4, 5], dtype=torch.int64),
        "d": torch.randn(2, 2).to(torch.float16),
    }
    specs = [TensorSpec(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs, metadata_bytes=100)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finish({"format": "pt", "note": "hello"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hello"}
    header_length = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]
    assert header_length % 8 == 0


def test_writer_refuses_what_was_not_planned(tmp_path):
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (2,))], 10)
    with pytest.raises(AssertionError):
        writer.write("a", torch.zeros(3))
    writer.close()


def test_shards_keep_groups_whole():
    group = [TensorSpec("w.packed", "U8", (10,)), TensorSpec("w.scales", "F16", (5,))]
    shards = split_into_shards([group, group, group], max_shard_bytes=25)
    assert [len(s) for s in shards] == [2, 2, 2]
    assert split_into_shards([group, group], None) == [group + group]


def test_staged_directory_replaces_only_on_success(tmp_path):
    destination = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(destination, force=False) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("boom")
    assert not destination.exists() and list(tmp_path.iterdir()) == []
    with staged_output(destination, force=False) as staging:
        (staging / "done").write_text("x")
    assert (destination / "done").exists()
    with pytest.raises(OutputError, match="--force"):
        with staged_output(destination, force=False):
            pass
    with staged_output(destination, force=True) as staging:
        (staging / "new").write_text("y")
    assert sorted(p.name for p in destination.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
