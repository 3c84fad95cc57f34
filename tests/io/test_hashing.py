"""Background hashes of source files (`io/hashing.py`), kept between runs only for the very same file."""

import hashlib
import os
import time

import pytest

from qconvert.io import hashing


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "memo"
    monkeypatch.setenv("QCONVERT_CACHE", str(folder))
    monkeypatch.setattr(hashing, "_started", {})
    monkeypatch.setattr(hashing, "SETTLED_S", 0.05)
    return folder


def settled_file(path, data: bytes):
    path.write_bytes(data)
    old = time.time() - 60
    os.utime(path, (old, old))  # written a minute ago
    time.sleep(0.1)  # and its change time (which utime sets to now) older than SETTLED_S: its hash may be kept
    return path


def test_a_settled_file_is_hashed_once_and_recalled_after(tmp_path, cache, monkeypatch):
    source = settled_file(tmp_path / "model.safetensors", b"weights" * 1000)
    hashing.start([source])
    assert hashing.result(source) == hashlib.sha256(source.read_bytes()).hexdigest()
    assert len(list(cache.glob("sha256-*.json"))) == 1

    monkeypatch.setattr(hashing, "_started", {})
    monkeypatch.setattr(hashing, "sha256_file", lambda path: pytest.fail("a kept hash was read again"))
    hashing.start([source])
    assert hashing.result(source) == hashlib.sha256(source.read_bytes()).hexdigest()


def test_rewritten_bytes_are_hashed_afresh_even_with_the_old_times(tmp_path, cache, monkeypatch):
    source = settled_file(tmp_path / "model.safetensors", b"weights" * 1000)
    hashing.start([source])
    hashing.result(source)
    stat = source.stat()
    source.write_bytes(b"WEIGHTS" * 1000)  # the same size, and the old modification time put back
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(hashing, "_started", {})
    hashing.start([source])
    assert hashing.result(source) == hashlib.sha256(b"WEIGHTS" * 1000).hexdigest()


def test_a_file_modified_just_now_is_not_kept(tmp_path, cache):
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"still being written")
    hashing.start([source])
    assert hashing.result(source) == hashlib.sha256(b"still being written").hexdigest()
    assert not list(cache.glob("sha256-*.json"))
