"""The generator training loop and the sample stage: memorisation, resume, NaN handling, decay groups, sampling."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dnd.generators as generators
from dnd.checkpoint import load_checkpoint, save_checkpoint
from dnd.config import validate
from dnd.generators.heldout import heldout_loss
from dnd.generators.sample import sample
from dnd.generators.train import EMA, learning_rate, train_generator, weight_decay_groups
from dnd.tokenizer.model import RQVAE

GRID, DEPTH, VOCAB, CLASSES = 4, 2, 8, 4


TINY = {"n_layer": 2, "n_head": 2, "dim": 32, "dropout": 0.0, "token_dropout": 0.0, "class_dropout": 0.0}


def make_codes(folder: Path, *, views: int = 1, seed: int = 0) -> np.ndarray:
    """4 random code grids (one per class), int16 (N, A, h, w, D), written like extract_codes does."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, VOCAB, (CLASSES, views, GRID, GRID, DEPTH)).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "codes.npy", codes)
    np.save(folder / "labels.npy", np.arange(CLASSES, dtype=np.int64))
    (folder / "manifest.json").write_text(json.dumps({"codebook_size": VOCAB, "depth": DEPTH, "grid": [GRID, GRID],
                                                         "views": views, "num_images": CLASSES}))
    return codes


def make_config(gen: dict, **train) -> dict:
    base_train = {"steps": 200, "batch_size": 4, "lr": 3e-3, "schedule": "constant", "warmup_steps": 5,
                  "weight_decay": 0.0, "ema_decay": 0.5, "ckpt_every": 1000, "log_every": 50}
    raw = {"seed": 1, "data": {"source": "skimage", "image_size": 16},
           "tokenizers": {"t": {"quantizer": {"depth": DEPTH, "codebook_size": VOCAB}}},
           "generators": {"g": {"tokenizer": "t", "size": "tiny", "overrides": dict(TINY), **gen,
                                "train": {**base_train, **train}}}}
    return validate(raw)


@pytest.mark.parametrize("gen", [{"kind": "dnd"}, {"kind": "ar1d", "code_depth": 1},
                                 {"kind": "ar1d", "flatten": True}, {"kind": "rqt"}],
                         ids=["dnd", "ar1d", "ar1d-flatten", "rqt"])
def test_memorises_four_sequences(tmp_path, gen):
    codes = make_codes(tmp_path / "codes")
    cfg = make_config(gen)
    out = tmp_path / "gen" / "model.pt"
    train_generator(cfg, "g", tmp_path / "codes", out, num_classes=CLASSES, device="cpu")

    model = generators.load(out)  # EMA weights
    got = model.generate(torch.arange(CLASSES), sampler=generators.Sampler(temperature=0.0))  # (4, L, d)
    depth = got.shape[-1]
    want = torch.from_numpy(codes[:, 0, :, :, :depth].astype(np.int64)).reshape(CLASSES, GRID * GRID, depth)
    assert torch.equal(got, want), f"{(got != want).float().mean():.1%} of the codes differ"

    rows = list(csv.DictReader(open(out.parent / "losses.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 201))
    assert list(rows[0]) == ["step", "loss", *[f"loss_d{d}" for d in range(depth)], "lr"]
    assert float(rows[-1]["loss"]) < 0.05 < float(rows[0]["loss"])
    assert not (out.parent / "resume.pt").exists()

    # Held-out loss: memorised training codes against unseen ones of the same grid.
    make_codes(tmp_path / "val", seed=1)
    held = heldout_loss(out, tmp_path / "val", tmp_path / "codes", tmp_path / "heldout.json", batch_size=3,
                        device="cpu")
    assert json.loads((tmp_path / "heldout.json").read_text()) == held
    assert held["num_items"] == CLASSES and len(held["val_ce_per_depth"]) == depth
    assert held["train_ce"] < 0.05 and held["val_ce"] > 1.0 and held["gap"] == held["val_ce"] - held["train_ce"]
    assert held["val_ce"] == pytest.approx(np.mean(held["val_ce_per_depth"]), rel=1e-5)


class Interrupt(Exception):
    pass


def fail_at_call(monkeypatch, call: int, *, nan: bool):
    """Make the built model's forward raise (or return a NaN loss) at its `call`-th invocation."""
    real_build = generators.build

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward, calls = model.forward, [0]

        def patched(codes, cond=None):
            calls[0] += 1
            logits, loss = forward(codes, cond)
            if calls[0] == call:
                if not nan:
                    raise Interrupt(f"killed at forward call {call}")
                loss = loss * float("nan")
            return logits, loss

        model.forward = patched
        return model

    monkeypatch.setattr(generators, "build", build)


RESUME_TRAIN = dict(steps=6, batch_size=2, grad_accum=2, ckpt_every=2, log_every=4, schedule="cosine",
                    warmup_steps=2, weight_decay=0.05, ema_decay=0.9)


def test_resume_gives_the_same_weights(tmp_path, monkeypatch):
    make_codes(tmp_path / "codes", views=3)
    # Dropout on, so the RNG stream matters too.
    cfg = make_config({"kind": "dnd", "overrides": {**TINY, "dropout": 0.1, "token_dropout": 0.1,
                                                     "class_dropout": 0.2}}, **RESUME_TRAIN)
    whole, split = tmp_path / "whole" / "model.pt", tmp_path / "split" / "model.pt"
    train_generator(cfg, "g", tmp_path / "codes", whole, num_classes=CLASSES, device="cpu")

    with monkeypatch.context() as m:
        fail_at_call(m, 4 * 2 + 2, nan=False)  # during step 5, after the step-4 checkpoint
        with pytest.raises(Interrupt):
            train_generator(cfg, "g", tmp_path / "codes", split, num_classes=CLASSES, device="cpu")
    assert load_checkpoint(split.parent / "resume.pt")["step"] == 4
    train_generator(cfg, "g", tmp_path / "codes", split, num_classes=CLASSES, device="cpu")

    a, b = load_checkpoint(whole), load_checkpoint(split)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert not torch.equal(a["model"]["heads.0.out.weight"], a["ema"]["heads.0.out.weight"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)
    assert (whole.parent / "losses.csv").read_text() == (split.parent / "losses.csv").read_text()


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    make_codes(tmp_path / "codes")
    # Losses are read back every 4 steps, checkpoints every 2: the step-6 checkpoint must not happen.
    cfg = make_config({"kind": "dnd"}, **{**RESUME_TRAIN, "steps": 8})
    out = tmp_path / "gen" / "model.pt"
    fail_at_call(monkeypatch, 4 * 2 + 1, nan=True)  # first micro-batch of step 5
    with pytest.raises(RuntimeError, match=r"at step 5\b.*resume\.pt \(step 4\) is untouched"):
        train_generator(cfg, "g", tmp_path / "codes", out, num_classes=CLASSES, device="cpu")
    ckpt = load_checkpoint(out.parent / "resume.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not out.exists()


def test_weight_decay_only_on_matrices_and_embeddings():
    toy = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = weight_decay_groups(toy, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(toy[0].weight), id(toy[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(toy[1].bias), id(toy[2].weight), id(toy[2].bias)}

    model = generators.build("dnd", "tiny", depth=2, codebook_size=VOCAB, grid=GRID, num_classes=CLASSES)
    decay, no_decay = weight_decay_groups(model, 0.05)
    norms = [m.weight for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert norms and {id(p) for p in norms} <= {id(p) for p in no_decay["params"]}
    assert id(model.tok_emb.weight) in {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_schedules():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=104)
    assert [learning_rate(s, schedule="constant", **kw) for s in (0, 3, 4, 103)] == [0.25, 1.0, 1.0, 1.0]
    cosine = [learning_rate(s, schedule="cosine", **kw) for s in range(104)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0] and cosine[4] == 1.0
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:])) and cosine[-1] < 1e-3
    assert learning_rate(54, schedule="cosine", **kw) == pytest.approx(0.5)


def test_ema_tracks_in_fp32_with_warmup():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update()  # first update: decay min(0.75, 1/10)
    assert ema.shadow["weight"].dtype == torch.float32
    assert torch.allclose(ema.shadow["weight"], start + 0.9 * 4.0)
    assert ema.shadow.keys() == model.state_dict().keys()
    for _ in range(100):  # (1 + t) / (10 + t) passes 0.75 at t = 24: the cap holds from there
        ema.update()
    assert ema.current_decay() == 0.75 and ema.updates == 101


def test_ema_forgets_the_initial_weights_in_a_short_run():
    # 1,000 steps at decay 0.999: without the warm-up 0.999^1000 = 37% of the shadow would
    # still be the random initialisation.
    model = nn.Linear(3, 2, bias=False)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.zero_()
    init = ema.shadow["weight"].clone()
    for _ in range(1000):
        ema.update()
    assert ema.shadow["weight"].abs().max() < 1e-12 * init.abs().max()


# ----------------------------------------------------------------------------- sample stage

def save_generator(path: Path, num_classes: int) -> None:
    torch.manual_seed(0)
    model = generators.build("dnd", "tiny", depth=DEPTH, codebook_size=VOCAB, grid=GRID, num_classes=num_classes)
    with torch.no_grad():  # the zero-initialised heads would give uniform logits
        for head in model.heads:
            head.out.weight.normal_(0, 1.0)
    state = model.state_dict()
    save_checkpoint({"config": {}, "model_args": model.model_args, "model": state, "ema": state, "step": 0}, path)


def save_tokenizer(path: Path) -> RQVAE:
    torch.manual_seed(0)
    tok = RQVAE(image_size=16, ch=8, ch_mult=[1, 2, 2], z_channels=4, embed_dim=4, depth=DEPTH, codebook_size=VOCAB)
    save_checkpoint({"config": {}, "model_args": tok.model_args, "model": tok.state_dict(), "step": 0}, path)
    return tok.eval()


SAMPLER = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 2.0, "num_samples": 5, "batch_size": 2,
           "seed": 3}


@pytest.mark.parametrize("num_classes", [CLASSES, 0], ids=["class-conditional", "unconditional"])
def test_sample_writes_reproducible_outputs(tmp_path, num_classes):
    save_generator(tmp_path / "gen.pt", num_classes)
    tok = save_tokenizer(tmp_path / "tok.pt")
    timing = sample(tmp_path / "gen.pt", tmp_path / "tok.pt", SAMPLER, tmp_path / "a", device="cpu")

    codes = np.load(tmp_path / "a" / "codes.npy")
    labels = np.load(tmp_path / "a" / "labels.npy")
    images = np.load(tmp_path / "a" / "images.npy")
    assert codes.dtype == np.int16 and codes.shape == (5, GRID * GRID, DEPTH)
    assert codes.min() >= 0 and codes.max() < VOCAB
    assert labels.tolist() == ([0, 1, 2, 3, 0] if num_classes else [-1] * 5)
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "a" / "timing.json").read_text())
    assert on_disk == pytest.approx(timing)
    assert {"seconds", "images_per_s", "ms_per_step", "num_samples", "batch_size", "device", "generate_seconds",
            "decode_seconds"} <= timing.keys()
    assert timing["seconds"] >= timing["generate_seconds"] + timing["decode_seconds"] > 0
    # The images are the tokenizer's decoding of the saved codes.
    with torch.no_grad():
        x = tok.decode_codes(torch.from_numpy(codes.astype(np.int64)).view(5, GRID, GRID, DEPTH))
    assert np.abs(((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy() - images).max() <= 1

    sample(tmp_path / "gen.pt", tmp_path / "tok.pt", SAMPLER, tmp_path / "b", device="cpu")
    assert np.array_equal(np.load(tmp_path / "b" / "codes.npy"), codes)
    assert np.array_equal(np.load(tmp_path / "b" / "images.npy"), images)
    sample(tmp_path / "gen.pt", tmp_path / "tok.pt", {**SAMPLER, "seed": 4}, tmp_path / "c", device="cpu")
    assert not np.array_equal(np.load(tmp_path / "c" / "codes.npy"), codes)
