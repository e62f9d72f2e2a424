"""Atomic writes and safe checkpoints: a failed write never leaves a file that looks complete."""
import json
import os

import numpy as np
import pytest
import torch

from dnd import checkpoint as ck


def _ckpt(step):
    return {"config": {"a": 1}, "model_args": {"dim": 4}, "model": {"w": torch.full((2, 2), float(step))},
            "step": step, "rng": ck.rng_state()}


def test_roundtrip_weights_only(tmp_path):
    p = tmp_path / "model.pt"
    ck.save_checkpoint(_ckpt(3), p)
    out = ck.load_checkpoint(p)
    assert out["step"] == 3 and torch.equal(out["model"]["w"], torch.full((2, 2), 3.0))


def test_rng_state_roundtrip():
    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3))
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_failed_write_leaves_nothing(tmp_path):
    p = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with ck.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "resume.pt"
    ck.save_checkpoint(_ckpt(1), p)

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError, match="previous checkpoint, if any, is intact"):
        ck.save_checkpoint(_ckpt(2), p)
    monkeypatch.undo()
    assert ck.load_checkpoint(p)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["resume.pt"]


def test_unsafe_pickle_refused(tmp_path):
    p = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, p)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        ck.load_checkpoint(p)


def test_missing_keys_rejected(tmp_path):
    with pytest.raises(ValueError, match="lacks keys"):
        ck.save_checkpoint({"model": {}}, tmp_path / "x.pt")


def test_save_json_numpy(tmp_path):
    ck.save_json({"a": np.float32(1.5), "b": np.arange(2)}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5, "b": [0, 1]}


def test_diverged_weights_never_replace_a_good_checkpoint(tmp_path):
    p = tmp_path / "resume.pt"
    ck.save_checkpoint(_ckpt(1), p)
    bad = _ckpt(2)
    bad["model"]["w"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite model weights at step 2"):
        ck.save_checkpoint(bad, p)
    assert ck.load_checkpoint(p)["step"] == 1
