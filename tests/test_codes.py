"""Code extraction (ten-crop views, shards, resume, determinism) and the cached code loader."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from dnd.checkpoint import save_checkpoint
from dnd.codes import CodeDataset, extract_codes, load_codes, views
from dnd.data.shards import SplitWriter
from dnd.tokenizer import RQVAE

N_IMAGES, SIZE = 13, 16




@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = RQVAE(image_size=SIZE, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, embed_dim=4,
                  depth=3, codebook_size=16)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    model.train()
    model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)  # data-initialise the codebook
    model_path = tmp_path / "tok" / "model.pt"
    save_checkpoint({"config": {}, "model_args": model.model_args, "model": model.state_dict(), "step": 1},
                    model_path)
    labels = rng.integers(0, 5, N_IMAGES).astype(np.int64)
    data = tmp_path / "data"
    with SplitWriter(data, capacity=N_IMAGES, image_size=SIZE, with_text=False) as writer:
        for image, label in zip(images, labels):
            writer.append(image, label)
        writer.commit({"source": "test"})
    return model_path, data, labels


def test_ten_crop_views_are_corners_centre_and_their_flips():
    images = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    v = views(images, SIZE, ten_crop=True)
    assert v.shape == (2, 10, 3, SIZE, SIZE) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    # views 5-9 are the crops of the flipped image: its top-left corner is the flipped top-right one, ...
    for flipped, original in ((5, 1), (6, 0), (7, 3), (8, 2)):
        torch.testing.assert_close(v[:, flipped], v[:, original].flip(-1))
    # top-left and bottom-right corners of the int(1.1 * 16) = 17 px enlargement differ by one pixel shift
    assert not torch.equal(v[:, 0], v[:, 3])
    single = views(images, SIZE, ten_crop=False)
    assert single.shape == (2, 1, 3, SIZE, SIZE)
    torch.testing.assert_close(single[:, 0], torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_extract_ten_crop_shape_manifest_and_determinism(setup, tmp_path):
    model_path, data, labels = setup
    extract_codes(model_path, data, tmp_path / "a", ten_crop=True, batch_size=20, shard_size=5, device="cpu")
    codes, got_labels, manifest = load_codes(tmp_path / "a")
    assert codes.dtype == np.int16 and codes.shape == (N_IMAGES, 10, 8, 8, 3)
    assert codes.min() >= 0 and codes.max() < 16
    assert np.array_equal(got_labels, labels) and got_labels.dtype == np.int64
    assert manifest["tokenizer_sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert (manifest["depth"], manifest["codebook_size"], manifest["grid"], manifest["views"],
            manifest["num_images"]) == (3, 16, [8, 8], 10, N_IMAGES)
    assert not (tmp_path / "a" / "shards").exists()
    extract_codes(model_path, data, tmp_path / "b", ten_crop=True, batch_size=20, shard_size=5, device="cpu")
    assert np.array_equal(codes, load_codes(tmp_path / "b")[0])
    # view 4 (centre) and view 9 (its flip) code different images
    assert not np.array_equal(codes[:, 4], codes[:, 9])


def test_extract_without_ten_crop_matches_encode(setup, tmp_path):
    model_path, data, _ = setup
    extract_codes(model_path, data, tmp_path / "c", ten_crop=False, batch_size=4, shard_size=100, device="cpu")
    codes, _, manifest = load_codes(tmp_path / "c")
    assert codes.shape == (N_IMAGES, 1, 8, 8, 3) and manifest["views"] == 1
    from dnd.tokenizer import load
    model = load(model_path)
    x = torch.from_numpy(np.load(data / "images.npy")).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert np.array_equal(codes[:, 0], model.encode(x).numpy())


def test_extraction_resumes_by_shard(setup, tmp_path, monkeypatch):
    model_path, data, _ = setup
    out = tmp_path / "codes"
    extract_codes(model_path, data, tmp_path / "ref", ten_crop=False, batch_size=3, shard_size=4, device="cpu")
    real_encode = RQVAE.encode
    calls = {"n": 0}

    def dying_encode(self, x):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 passes per shard of 4 images: dies inside the third shard
            raise KeyboardInterrupt("killed")
        return real_encode(self, x)

    monkeypatch.setattr(RQVAE, "encode", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        extract_codes(model_path, data, out, ten_crop=False, batch_size=3, shard_size=4, device="cpu")
    assert sorted(p.name for p in (out / "shards").glob("0*.npy")) == ["000000.npy", "000001.npy"]
    assert not (out / "manifest.json").exists() and not (out / "codes.npy").exists()
    calls["n"] = -100
    extract_codes(model_path, data, out, ten_crop=False, batch_size=3, shard_size=4, device="cpu")
    assert calls["n"] == -100 + 3  # shards 2 (two passes) and 3 (one image, one pass) only
    assert np.array_equal(load_codes(out)[0], load_codes(tmp_path / "ref")[0])


def test_stale_shards_from_other_settings_are_discarded(setup, tmp_path):
    model_path, data, _ = setup
    out = tmp_path / "codes"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "meta.json").write_text(json.dumps({"tokenizer_sha256": "something else"}))
    np.save(out / "shards" / "000000.npy", np.full((4, 1, 8, 8, 3), 15, np.int16))
    extract_codes(model_path, data, out, ten_crop=False, batch_size=3, shard_size=4, device="cpu")
    extract_codes(model_path, data, tmp_path / "ref", ten_crop=False, batch_size=3, shard_size=4, device="cpu")
    assert np.array_equal(load_codes(out)[0], load_codes(tmp_path / "ref")[0])


def test_code_dataset_items_views_and_depth(setup, tmp_path):
    model_path, data, labels = setup
    extract_codes(model_path, data, tmp_path / "c", ten_crop=True, batch_size=32, shard_size=100, device="cpu")
    codes = np.load(tmp_path / "c" / "codes.npy")
    ds = CodeDataset(tmp_path / "c", depth=2, generator=torch.Generator().manual_seed(0))
    assert len(ds) == N_IMAGES
    item, label = ds[3]
    assert item.dtype == torch.int64 and item.shape == (64, 2)
    assert label.dtype == torch.int64 and label.ndim == 0 and label.item() == labels[3]
    # the item is one stored view, first 2 depths, row-major
    matches = [v for v in range(10) if np.array_equal(item.numpy(), codes[3, v, :, :, :2].reshape(64, 2))]
    assert matches
    seen = {tuple(ds[3][0].flatten().tolist()) for _ in range(30)}
    assert len(seen) > 1, "views must be drawn at random"
    # the same generator seed draws the same views
    a, b = (CodeDataset(tmp_path / "c", depth=2, generator=torch.Generator().manual_seed(0)) for _ in range(2))
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(5))
    assert CodeDataset(tmp_path / "c")[0][0].shape == (64, 3)
    with pytest.raises(ValueError, match="holds 3 depths"):
        CodeDataset(tmp_path / "c", depth=4)


def test_load_codes_errors(setup, tmp_path):
    model_path, data, _ = setup
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_codes(tmp_path / "nothing")
    extract_codes(model_path, data, tmp_path / "c", ten_crop=False, batch_size=8, shard_size=100, device="cpu")
    np.save(tmp_path / "c" / "codes.npy", np.zeros((N_IMAGES, 1, 8, 8, 2), np.int16))
    with pytest.raises(ValueError, match="expected int16"):
        load_codes(tmp_path / "c")


def test_extract_needs_a_finished_split(setup, tmp_path):
    model_path, data, _ = setup
    (data / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        extract_codes(model_path, data, tmp_path / "c", ten_crop=False, batch_size=8, shard_size=100, device="cpu")
