"""Tests of ndopt.io: atomic writes leave either the old or the new content, never a mix or a temp."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ndopt.io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


class Boom(Exception):
    pass


def test_write_bytes_and_text(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.bin"  # parent is created
    atomic_write_bytes(p, b"\x00\x01old")
    assert p.read_bytes() == b"\x00\x01old"
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert _listing(tmp_path / "sub") == ["a.bin"]


def test_write_json_format_and_scalars(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    obj = {"z": np.float32(1.5), "a": torch.tensor(3), "n": np.int64(7), "path": Path("x/y")}
    atomic_write_json(p, obj)
    text = p.read_text()
    assert text.endswith("}\n")
    assert text == '{\n  "z": 1.5,\n  "a": 3,\n  "n": 7,\n  "path": "x/y"\n}\n'  # insertion order
    assert json.loads(text) == {"z": 1.5, "a": 3, "n": 7, "path": "x/y"}


def test_write_json_unserializable_leaves_old_file(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(TypeError, match="ndarray"):
        atomic_write_json(p, {"arr": np.zeros(3)})  # arrays are not silently converted
    assert json.loads(p.read_text()) == {"ok": 1}
    assert _listing(tmp_path) == ["m.json"]


def test_atomic_path_failing_writer_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "model.onnx"
    p.write_bytes(b"old")
    with pytest.raises(Boom), atomic_path(p) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.endswith("model.onnx")  # suffix kept for format-sniffing writers
        tmp.write_bytes(b"half-written")
        raise Boom
    assert p.read_bytes() == b"old"
    assert _listing(tmp_path) == ["model.onnx"]


def test_atomic_path_success_replaces(tmp_path: Path) -> None:
    p = tmp_path / "plot.png"
    p.write_bytes(b"old")
    with atomic_path(p) as tmp:
        tmp.write_bytes(b"new")
        assert p.read_bytes() == b"old"  # not visible until the block ends
    assert p.read_bytes() == b"new"
    assert _listing(tmp_path) == ["plot.png"]


def test_atomic_path_writer_that_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="did not create"), atomic_path(p):
        pass
    assert p.read_bytes() == b"old"
    assert _listing(tmp_path) == ["x.bin"]


def test_write_bytes_failure_during_write_keeps_old(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert _listing(tmp_path) == ["a.bin"]


def test_atomic_dir_swaps_whole_directory(tmp_path: Path) -> None:
    d = tmp_path / "component"
    d.mkdir()
    (d / "old.txt").write_text("old")
    (d / "keep.txt").write_text("v1")
    with atomic_dir(d) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp != d
        (tmp / "keep.txt").write_text("v2")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "n.txt").write_text("n")
        assert (d / "old.txt").read_text() == "old"  # old one intact while writing
    assert _listing(d) == ["keep.txt", "nested"]  # replaced as a whole: old.txt is gone
    assert (d / "keep.txt").read_text() == "v2"
    assert (d / "nested" / "n.txt").read_text() == "n"
    assert _listing(tmp_path) == ["component"]  # no temp, no backup


def test_atomic_dir_new_directory(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    with atomic_dir(d) as tmp:
        (tmp / "f").write_text("x")
    assert (d / "f").read_text() == "x"
    assert _listing(tmp_path / "a") == ["b"]


def test_atomic_dir_failure_keeps_old_directory(tmp_path: Path) -> None:
    d = tmp_path / "component"
    d.mkdir()
    (d / "old.txt").write_text("old")
    with pytest.raises(Boom), atomic_dir(d) as tmp:
        (tmp / "new.txt").write_text("new")
        raise Boom
    assert _listing(d) == ["old.txt"]
    assert (d / "old.txt").read_text() == "old"
    assert _listing(tmp_path) == ["component"]


def test_atomic_dir_failed_swap_restores_backup(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "component"
    d.mkdir()
    (d / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the rename of the new directory into place
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_dir(d) as tmp:
        (tmp / "new.txt").write_text("new")
    assert calls[0][0] == "component" and calls[1][1] == "component"
    assert _listing(d) == ["old.txt"]
    assert _listing(tmp_path) == ["component"]
