"""Run outputs are atomic: an interrupted write keeps the old file and leaves no temp."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tgd_jax.io import workdir


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    workdir.write_json(path, {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        workdir.write_json(path, {"a": 2})
    assert json.loads(path.read_text())["a"] == 1.5  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp left


def test_append_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    workdir.append_jsonl(path, {"step": 1, "loss": np.float32(0.5)})
    workdir.append_jsonl(path, {"step": 2, "loss": 0.25})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_atomic_path_publishes_only_a_completed_file(tmp_path):
    target = tmp_path / "out.h5"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        with workdir.atomic_path(target, suffix=".h5") as tmp:
            assert tmp.suffix == ".h5" and tmp.parent == tmp_path
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    with workdir.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
