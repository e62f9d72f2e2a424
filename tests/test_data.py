"""Data sets: corpus cleaning, text rendering ground truth, image-folder import, skimage crops, split storage."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dnd.data
from dnd.config import validate
from dnd.data import BadImageError, load_split, prepare_data
from dnd.data.image_folder import center_crop_arr, list_images, load_image
from dnd.data.shards import SplitWriter
from dnd.data.text import (_load_font, load_corpus, page_layout, page_texts, render_text_images, resolve_font,
                           wrap_lines)

PAGE = dict(image_size=64, font="DejaVuSans.ttf", font_size=12, margin=4, line_spacing=1.15)
LONG = ("The quick brown fox jumps over the lazy dog while a small cat sits on a mat and "
        "watches the birds fly over the old red barn near the river in the late afternoon sun.")


def data_cfg(**data) -> dict:
    return validate({"data": data})["data"]


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- corpus -----------------------------------------------------------------------------------

def test_default_corpus_is_clean_prose():
    paragraphs = load_corpus(None, min_words=3)
    assert len(paragraphs) > 500
    assert len(set(paragraphs)) == len(paragraphs)
    for p in paragraphs:
        assert len(p.split()) >= 3
        assert p == " ".join(p.split())  # whitespace collapsed
        assert ">>>" not in p and "::=" not in p and "+--" not in p and "|" not in p
        assert p[-1] in ".?!:"
    # reST emphasis markers are removed, word-ending hyphenation is re-joined
    assert not any("**CPython" in p for p in paragraphs)
    assert not any(p.startswith("* ") for p in paragraphs)


def test_corpus_file_paragraphs_and_min_words(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First  paragraph has\nfive words.\n\n\nToo short.\n   \nThird paragraph is here now.\n")
    assert load_corpus(str(corpus), min_words=3) == ["First paragraph has five words.", "Third paragraph is here now."]


@pytest.mark.parametrize("content", [b"", b"one two\n\nthree\n", b"\xff\xfe not utf-8 \x80\x81 at all here"])
def test_corpus_without_usable_paragraph_names_the_file(tmp_path, content):
    corpus = tmp_path / "bad_corpus.txt"
    corpus.write_bytes(content)
    with pytest.raises(ValueError, match="bad_corpus.txt"):
        load_corpus(str(corpus), min_words=3)


def test_page_texts_take_paragraph_starts_then_sentence_starts_then_word_starts():
    paragraphs = ["One two three. Four five six! Seven eight.", "Nine ten eleven twelve."]
    texts, kinds = page_texts(paragraphs, 4, max_words=4, min_words=2)
    assert texts == ["One two three. Four", "Nine ten eleven twelve.", "Four five six! Seven", "Seven eight."]
    assert kinds == {"paragraph": 2, "sentence": 2, "word": 0}
    texts, kinds = page_texts(paragraphs, 6, max_words=4, min_words=2)
    assert texts[4:] == ["two three. Four five", "ten eleven twelve."] and kinds["word"] == 2
    every, _ = page_texts(paragraphs, 10, max_words=4, min_words=2)  # 7 + 3 starts leave >= 2 words
    assert len(set(every)) == 10
    with pytest.raises(ValueError, match="tiny.txt.*11 are needed"):
        page_texts(paragraphs, 11, max_words=4, min_words=2, corpus="tiny.txt")


# --- rendering --------------------------------------------------------------------------------

def ink_rows(image: np.ndarray) -> np.ndarray:
    return np.flatnonzero((image < 255).any(axis=(1, 2)))


def test_rendered_page_shows_exactly_its_ground_truth():
    images, drawn = render_text_images([LONG], **PAGE)
    image, visible = images[0], drawn[0]
    words, shown = LONG.split(), visible.split()
    # a paragraph longer than the page is cut at a word boundary: a strict prefix
    assert 0 < len(shown) < len(words) and words[:len(shown)] == shown
    # the page with only the visible text is the same page, and so is the visible text plus the next word
    again, again_drawn = render_text_images([visible, visible + " " + words[len(shown)]], **PAGE)
    assert np.array_equal(again[0], image) and np.array_equal(again[1], image)
    assert again_drawn == [visible, visible]
    # ink lies exactly in the bands of the drawn lines, every band has ink, below them the page is white
    font = _load_font(str(resolve_font(PAGE["font"])), PAGE["font_size"])
    width, pitch, max_lines = page_layout(image_size=64, font=font, font_size=12, margin=4, line_spacing=1.15)
    lines = wrap_lines(visible, font, width)
    assert len(lines) == max_lines and " ".join(lines) == visible
    ascent, descent = font.getmetrics()
    bands = [(4 + r * pitch, 4 + r * pitch + ascent + descent) for r in range(len(lines))]
    rows = ink_rows(image)
    assert all(any(lo <= y < hi for lo, hi in bands) for y in rows)
    assert all(((rows >= lo) & (rows < hi)).any() for lo, hi in bands)
    assert rows.max() < 64 - 4
    cols = np.flatnonzero((image < 255).any(axis=(0, 2)))
    assert cols.min() >= 4 - 1 and cols.max() < 64 - 4  # antialiasing may touch one margin column
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_short_text_is_drawn_whole_and_empty_text_is_a_white_page():
    images, drawn = render_text_images(["Short text.", ""], **PAGE)
    assert drawn == ["Short text.", ""]
    assert len(ink_rows(images[0])) > 0
    assert (images[1] == 255).all()


def test_word_wider_than_the_page_is_broken_between_characters():
    font = _load_font(str(resolve_font("DejaVuSans.ttf")), 12)
    word = "internationalisation"
    lines = wrap_lines(f"an {word} ok", font, 40)
    assert "".join(lines).replace(" ", "") == f"an{word}ok"
    assert all(font.getlength(line) <= 40 for line in lines)


def test_unknown_font_lists_the_shipped_fonts():
    with pytest.raises(ValueError, match="DejaVuSans.ttf"):
        render_text_images(["x y z"], **{**PAGE, "font": "NoSuchFont.ttf"})


def test_paper_page_setting_renders():
    images, drawn = render_text_images([" ".join(LONG.split()[:30])], image_size=512, font="DejaVuSans",
                                       font_size=32, margin=20, line_spacing=1.15)
    assert images.shape == (1, 512, 512, 3) and len(drawn[0].split()) == 30


# --- text data set ----------------------------------------------------------------------------

def test_text_data_set_is_reproducible_and_its_texts_are_what_is_drawn(tmp_path):
    cfg = data_cfg(source="text", num_train=24, num_val=6)
    summary = prepare_data(cfg, tmp_path / "a", seed=3)
    prepare_data(cfg, tmp_path / "b", seed=3)
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    assert summary["num_classes"] == 0 and summary["train"]["num_images"] == 24
    train, val = load_split(tmp_path / "a" / "train", verify=True), load_split(tmp_path / "a" / "val")
    assert train.images.shape == (24, 64, 64, 3) and (train.labels == 0).all()
    assert not set(train.texts) & set(val.texts)
    rendered, drawn = render_text_images(train.texts[:5], **PAGE)
    assert np.array_equal(rendered, train.images[:5]) and drawn == train.texts[:5]
    rows = [json.loads(line) for line in (tmp_path / "a" / "val" / "text.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    other = prepare_data(cfg, tmp_path / "c", seed=4)
    assert other["train"]["images_sha256"] != summary["train"]["images_sha256"]


def test_too_small_corpus_for_the_requested_images_names_the_file(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("A first short paragraph.\n\nA second short paragraph.\n\nA third one here.\n")
    with pytest.raises(ValueError, match="small.txt"):
        prepare_data(data_cfg(source="text", num_train=100, num_val=1, text={"corpus": str(corpus)}),
                     tmp_path / "out", seed=0)


@pytest.mark.parametrize("fail_at_call", [1, 2])
def test_failed_run_leaves_no_partial_file_and_no_manifest(tmp_path, monkeypatch, fail_at_call):
    cfg = data_cfg(source="text", num_train=8, num_val=2)
    prepare_data(cfg, tmp_path, seed=0)
    calls = []

    def render_then_fail(texts, **kw):  # call 1 renders train, call 2 renders val
        calls.append(1)
        if len(calls) == fail_at_call:
            raise RuntimeError("simulated crash while rendering")
        return render_text_images(texts, **kw)

    monkeypatch.setattr(dnd.data, "render_text_images", render_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare_data(data_cfg(source="text", num_train=9, num_val=2), tmp_path, seed=0)
    assert not list(tmp_path.rglob("*.tmp"))
    # only a split the new run completed has a manifest; the old run's manifests are gone
    assert (tmp_path / "train" / "manifest.json").is_file() == (fail_at_call == 2)
    assert not (tmp_path / "val" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        load_split(tmp_path / "val")
    if fail_at_call == 2:
        assert len(load_split(tmp_path / "train", verify=True)) == 9


# --- split storage ----------------------------------------------------------------------------

def test_split_writer_cuts_an_over_allocated_split_to_size(tmp_path):
    with SplitWriter(tmp_path, capacity=5, image_size=8, with_text=False) as writer:
        for i in range(3):
            writer.append(np.full((8, 8, 3), i, np.uint8), i)
        writer.commit({"source": "test", "num_classes": 3, "class_names": ["a", "b", "c"], "skipped": 0})
    split = load_split(tmp_path, verify=True)
    assert split.images.shape == (3, 8, 8, 3) and list(split.labels) == [0, 1, 2]
    assert [int(img[0, 0, 0]) for img in split.images] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npy", "labels.npy", "manifest.json"]
    split.images[0] = 77  # copy-on-write: changes in memory never reach the stored file
    assert load_split(tmp_path, verify=True).images[0].max() == 0


def test_load_split_errors_on_missing_or_inconsistent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_split(tmp_path / "nowhere")
    prepare_data(data_cfg(source="skimage", num_train=4, num_val=2, image_size=16), tmp_path, seed=0)
    (tmp_path / "val" / "images.npy").unlink()
    with pytest.raises(FileNotFoundError, match="images.npy missing"):
        load_split(tmp_path / "val")
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({**manifest, "num_images": 5}))
    with pytest.raises(ValueError, match="does not match"):
        load_split(tmp_path / "train")


# --- scikit-image photographs -----------------------------------------------------------------

def test_skimage_crops_are_distinct_labelled_and_reproducible(tmp_path):
    cfg = data_cfg(source="skimage", num_train=40, num_val=10, image_size=32)
    summary = prepare_data(cfg, tmp_path / "a", seed=0)
    prepare_data(cfg, tmp_path / "b", seed=0)
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    k = summary["num_classes"]
    assert k >= 5 and len(summary["class_names"]) == k
    train, val = load_split(tmp_path / "a" / "train"), load_split(tmp_path / "a" / "val")
    every = np.concatenate([train.images, val.images])
    assert len({img.tobytes() for img in every}) == 50
    assert train.labels.min() >= 0 and train.labels.max() < k
    assert set(train.labels.tolist()) == set(range(k))  # balanced: every photo is a class with images
    assert train.images.std() > 20  # photographs, not flat colour


# --- image folder -----------------------------------------------------------------------------

def save(path: Path, image: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)


def truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])


@pytest.fixture
def photo_root(tmp_path) -> Path:
    """Two classes of flat-colour images in every awkward format; the colour each must come out as."""
    root = tmp_path / "photos"
    save(root / "cat" / "rgb.png", Image.new("RGB", (40, 30), (200, 10, 30)))
    save(root / "cat" / "grey.jpg", Image.new("L", (30, 50), 90), quality=100)
    save(root / "cat" / "wide16.png", Image.fromarray(np.full((20, 44), 51400, np.uint16)))
    save(root / "dog" / "opaque.png", Image.new("RGBA", (36, 36), (0, 120, 240, 255)))
    save(root / "dog" / "clear.png", Image.new("RGBA", (36, 36), (0, 0, 0, 0)))
    save(root / "dog" / "palette.png", Image.new("RGB", (25, 25), (0, 255, 0)).convert("P"))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


EXPECTED = {((200, 10, 30), 0), ((90, 90, 90), 0), ((200, 200, 200), 0),
            ((0, 120, 240), 1), ((255, 255, 255), 1), ((0, 255, 0), 1)}


def colours(split) -> set:
    return {(tuple(int(c) for c in img[8, 8]), int(label)) for img, label in zip(split.images, split.labels)}


def test_image_folder_import_converts_every_format_and_labels_by_sorted_class(photo_root, tmp_path):
    cfg = data_cfg(source="image_folder", image_size=16, num_val=2, image_folder={"root": str(photo_root)})
    summary = prepare_data(cfg, tmp_path / "a", seed=0)
    assert summary["class_names"] == ["cat", "dog"] and summary["num_classes"] == 2
    train, val = load_split(tmp_path / "a" / "train"), load_split(tmp_path / "a" / "val")
    assert len(val) == 2 and len(train) == 4
    for split in (train, val):  # flat colours stay flat through the crop and resize (grey JPEG: near)
        assert (np.abs(split.images.astype(int) - split.images[:, 8:9, 8:9].astype(int)) <= 2).all()
    got = colours(train) | colours(val)
    assert len(got) == 6
    for (colour, label) in EXPECTED:
        assert any(lab == label and max(abs(a - b) for a, b in zip(c, colour)) <= 2 for c, lab in got)
    # the same bytes again, also when the decoding runs in worker processes
    prepare_data({**cfg, "workers": 2}, tmp_path / "b", seed=0)
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")


def test_num_train_caps_the_train_split(photo_root, tmp_path):
    cfg = data_cfg(source="image_folder", image_size=8, num_train=2, num_val=1, image_folder={"root": str(photo_root)})
    summary = prepare_data(cfg, tmp_path, seed=0)
    assert summary["train"]["num_images"] == 2 and summary["val"]["num_images"] == 1


def test_truncated_image_is_an_error_naming_it_or_skipped_and_counted(photo_root, tmp_path):
    truncated_jpeg(photo_root / "dog" / "broken.jpg")
    cfg = data_cfg(source="image_folder", image_size=16, num_val=1, image_folder={"root": str(photo_root)})
    with pytest.raises(BadImageError, match="broken.jpg"):
        prepare_data(cfg, tmp_path / "strict", seed=0)
    assert not list((tmp_path / "strict").rglob("*.tmp"))
    summary = prepare_data({**cfg, "skip_bad_images": True}, tmp_path / "lenient", seed=0)
    assert summary["skipped"] == 1
    split = "val" if summary["val"]["skipped"] else "train"
    assert summary[split]["skipped_files"] == [str(Path("dog") / "broken.jpg")]
    assert summary["train"]["num_images"] + summary["val"]["num_images"] == 6


def test_load_image_errors_name_the_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    with pytest.raises(BadImageError, match="garbage.png"):
        load_image(tmp_path / "garbage.png", 16)
    save(tmp_path / "float.tif", Image.fromarray(np.ones((8, 8), np.float32)))
    with pytest.raises(BadImageError, match="float.tif.*mode F"):
        load_image(tmp_path / "float.tif", 16)


def test_empty_root_and_empty_class_are_errors_naming_them(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(ValueError, match="root: no class folders"):
        list_images(tmp_path / "root")
    save(tmp_path / "root" / "full" / "a.png", Image.new("RGB", (8, 8)))
    (tmp_path / "root" / "hollow").mkdir()
    (tmp_path / "root" / "hollow" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="hollow holds no image file"):
        list_images(tmp_path / "root")


def test_adm_center_crop_keeps_the_central_square():
    # 200 x 100: black bands left and right of a white central 100 x 100 square
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 50:150] = 255
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    assert (out[:, 2:-2] >= 250).all()  # interior white; bicubic may only soften the outermost columns
