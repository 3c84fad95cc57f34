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


def _copied_twice(tmp_path, monkeypatch, second_run_setup):
    """Copy a 2 MB tensor from a settled source file into two outputs; the second after `second_run_setup`."""
    import hashlib
    import os
    import time

    from qconvert.io import hashing
    from qconvert.io.loading import SourceBytes

    monkeypatch.setenv("QCONVERT_CACHE", str(tmp_path / "memo"))
    monkeypatch.setattr(hashing, "SETTLED_S", 0.05)
    data = torch.arange(1 << 20, dtype=torch.int16).view(torch.bfloat16)
    raw = data.view(torch.int16).numpy().tobytes()
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 100 + raw)
    os.utime(source, (time.time() - 60, time.time() - 60))
    time.sleep(0.1)
    piece = SourceBytes(source, 100, data.numel() * 2, torch.bfloat16, (data.numel(),))
    digests = []
    for run in range(2):
        if run:
            second_run_setup()
        out = tmp_path / f"out{run}.safetensors"
        writer = SafetensorsStreamWriter(out, [TensorSpec("t", "BF16", (data.numel(),))], metadata_bytes=64)
        digests.append(writer.copy("t", piece))
        writer.finish({})
        assert load_file(out)["t"].view(torch.int16).numpy().tobytes() == raw
    assert digests == [hashlib.sha256(raw).hexdigest()] * 2


def test_kept_bytes_are_copied_in_the_kernel_the_second_time(tmp_path, monkeypatch):
    def no_reading():
        monkeypatch.setattr(SafetensorsStreamWriter, "_copy_hashing", lambda *a: pytest.fail("read the bytes again"))

    _copied_twice(tmp_path, monkeypatch, no_reading)


@pytest.mark.parametrize("refusal", ["EXDEV", "EPERM", 0])
def test_a_filesystem_without_copy_file_range_gets_the_bytes_read(tmp_path, monkeypatch, refusal):
    import errno
    import os

    def refuse(*args):
        if refusal == 0:
            return 0  # what some filesystems answer instead of an error
        raise OSError(getattr(errno, refusal), refusal)

    _copied_twice(tmp_path, monkeypatch, lambda: monkeypatch.setattr(os, "copy_file_range", refuse))
