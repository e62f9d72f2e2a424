"""Paragraphs of real English text and their rendering as black text on a white page.

The corpus is either a user file (paragraphs separated by blank lines) or, by
default, the reference documentation that CPython ships in `pydoc_data.topics`,
which is available offline on every Python installation. That text mixes prose with
grammar rules, code samples and tables, so the default corpus keeps only blocks that
read as sentences. When a split needs more pages than the corpus has paragraphs,
`page_texts` also starts pages at later sentences, and then at later words.

Rendering follows the paper's text-image data (arXiv 2410.01912): PIL, a TrueType
font, greedy word wrap to the page width, and the page simply ends at the last line
that fits. The ground truth of an image is exactly the text drawn on it, never the
part of the paragraph that fell off the page.
"""
from __future__ import annotations

import re
import textwrap
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A heading underline in the pydoc text ("*****", "=====", "-----").
_UNDERLINE = re.compile(r"^([*=\-^~\"#])\1{2,}$")
# Interactive prompts, grammar rules, table borders: never prose.
_CODE_MARKERS = re.compile(r">>>|::=|^\s*\.\.\.|\+--|\||^\s*[{}]", re.MULTILINE)
_BULLET = re.compile(r"^(?:[*\-•]|\d+\.)\s+")
# reST emphasis as pydoc prints it (*word*, **PEP 8**); a lone quoted "*" operator is not emphasis.
_EMPHASIS = re.compile(r"(?<![\w*\"])\*{1,2}(\w[^*\"]*?[^\s*\"]|\w)\*{1,2}(?![\w*\"])")
# Characters a prose sentence is made of; code and tables are rich in others (=[]{}<>_#/).
_PROSE_CHARS = set(" .,;:'\"’‘“”()-–—?!*")
# A sentence ends at . ! or ? followed by a space and a capital letter (or an opening quote).
_SENTENCE_START = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“*(])")


def pydoc_topics_text() -> tuple[str, ...]:
    """The documentation topics CPython ships, in a stable (sorted-key) order."""
    from pydoc_data import topics

    return tuple(topics.topics[key] for key in sorted(topics.topics))


def _clean_paragraph(block: str) -> str | None:
    """One pydoc text block -> a cleaned prose paragraph, or None when it is not prose."""
    lines = textwrap.dedent(block.strip("\n")).split("\n")
    if any(_UNDERLINE.match(line.strip()) for line in lines):
        return None  # a heading
    raw = "\n".join(lines)
    if _CODE_MARKERS.search(raw):
        return None
    # Re-join words that the fixed-width pydoc text hyphenated at a line end.
    raw = re.sub(r"(\w)-\n\s*(\w)", r"\1-\2", raw)
    text = _EMPHASIS.sub(r"\1", _BULLET.sub("", " ".join(raw.split())))
    if not text or not re.match(r"[A-Z\"“*(]", text) or not text.endswith((".", "?", "!", ":")):
        return None
    if sum(c.isalpha() or c in _PROSE_CHARS for c in text) < 0.95 * len(text):
        return None
    words = text.split()
    plain = sum(w.strip(".,;:'\"’‘“”()*?!").isalpha() for w in words)
    if plain < 0.8 * len(words):
        return None
    return text


def load_corpus(path: str | None, *, min_words: int) -> list[str]:
    """Paragraphs (whitespace collapsed to single spaces) with at least `min_words` words.

    `path` None: the cleaned prose of `pydoc_data.topics`, duplicates removed, in a
    stable order. Otherwise a UTF-8 text file whose paragraphs are separated by blank
    lines; each paragraph is kept as written (only its whitespace is collapsed).
    """
    if path is None:
        name = "pydoc_data.topics"
        blocks = [b for topic in pydoc_topics_text() for b in re.split(r"\n[ \t]*\n", topic)]
        candidates = [_clean_paragraph(b) for b in blocks]
    else:
        name = str(path)
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"text corpus {name}: file not found (data.text.corpus)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"text corpus {name}: not UTF-8 text ({e}); expected a UTF-8 file "
                             f"with paragraphs separated by blank lines") from None
        candidates = [" ".join(b.split()) for b in re.split(r"\n[ \t]*\n", raw)]
    paragraphs = [p for p in dict.fromkeys(candidates) if p and len(p.split()) >= min_words]
    if not paragraphs:
        raise ValueError(f"text corpus {name}: no usable paragraph; expected paragraphs of at least "
                         f"{min_words} words (data.text.min_words) separated by blank lines")
    return paragraphs


def sentence_starts(paragraph: str) -> list[int]:
    """Word offsets at which the sentences of `paragraph` begin (the first is 0)."""
    starts, words_before = [], 0
    for sentence in _SENTENCE_START.split(paragraph):
        starts.append(words_before)
        words_before += len(sentence.split())
    return starts


def page_texts(paragraphs: list[str], count: int, *, max_words: int, min_words: int,
               corpus: str = "<corpus>") -> tuple[list[str], dict[str, int]]:
    """`count` different page texts of at most `max_words` words cut from `paragraphs`, most natural first.

    First the start of every paragraph (the paper's data), then the start of every
    paragraph's 2nd, 3rd, ... sentence, and only when those run out, starts at the
    1st, 2nd, ... word after a paragraph start (a small corpus still gives many
    different pages; a small page shows only the first words). Returns the texts and
    how many of each kind were used; ValueError naming `corpus` when it cannot give `count`.
    """
    words = [p.split() for p in paragraphs]
    sentences = [sentence_starts(p) for p in paragraphs]

    def candidates():
        for k in range(max(map(len, sentences), default=0)):
            for i, starts in enumerate(sentences):
                if k < len(starts):
                    yield ("paragraph" if k == 0 else "sentence"), i, starts[k]
        for offset in range(1, max(map(len, words), default=0)):
            for i, starts in enumerate(sentences):
                if offset not in starts:
                    yield "word", i, offset

    texts: list[str] = []
    seen: set[str] = set()
    kinds = {"paragraph": 0, "sentence": 0, "word": 0}
    for kind, i, start in candidates():
        window = words[i][start: start + max_words]
        text = " ".join(window)
        if len(window) < min_words or text in seen:
            continue
        texts.append(text)
        seen.add(text)
        kinds[kind] += 1
        if len(texts) == count:
            return texts, kinds
    raise ValueError(f"text corpus {corpus}: its {len(paragraphs)} paragraph(s) give only {len(texts)} "
                     f"different page texts of at least {min_words} words, but {count} are needed; give a "
                     f"larger corpus (data.text.corpus) or ask for fewer images (data.num_train / num_val)")


def fonts_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def resolve_font(font: str) -> Path:
    """A TrueType path, or the file name (with or without .ttf) of a font matplotlib ships."""
    if Path(font).is_file():
        return Path(font)
    shipped = fonts_dir()
    for candidate in (shipped / font, shipped / f"{font}.ttf"):
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in shipped.glob("*.ttf"))
    raise ValueError(f"font {font!r} (data.text.font) is neither a file nor a font matplotlib ships; "
                     f"available in {shipped}: {', '.join(available)}")


@lru_cache(maxsize=8)
def _load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def wrap_lines(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap so that each line is at most `width` pixels long.

    A single word wider than the page is broken between characters (no hyphen is
    added, so the drawn text is still exactly the line strings).
    """
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while font.getlength(word) > width:
            cut = 1  # at least one character per line, even if it alone is too wide
            while cut < len(word) and font.getlength(word[:cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines


def page_layout(*, image_size: int, font: ImageFont.FreeTypeFont, font_size: int, margin: int,
                line_spacing: float) -> tuple[int, int, int]:
    """(text width in px, line pitch in px, number of lines that fit on the page).

    A line fits when its full glyph box (ascent + descent) ends inside the bottom margin.
    """
    width = image_size - 2 * margin
    if width <= 0:
        raise ValueError(f"margin {margin} leaves no room on a {image_size} px page (data.text.margin)")
    ascent, descent = font.getmetrics()
    pitch = max(1, round(font_size * line_spacing))
    room = image_size - 2 * margin - (ascent + descent)
    return width, pitch, (room // pitch + 1) if room >= 0 else 0


def render_text_images(texts: list[str], *, image_size: int, font: str, font_size: int, margin: int,
                       line_spacing: float) -> tuple[np.ndarray, list[str]]:
    """Render each text black on a white page; return (N, H, W, 3) uint8 images and the drawn texts.

    The drawn text of an image is its visible lines joined by single spaces: the full
    text when it fits, otherwise the words up to the last line that fits.
    """
    ttf = _load_font(str(resolve_font(font)), font_size)
    width, pitch, max_lines = page_layout(image_size=image_size, font=ttf, font_size=font_size,
                                          margin=margin, line_spacing=line_spacing)
    images = np.empty((len(texts), image_size, image_size, 3), np.uint8)  # (N, H, W, 3)
    drawn = []
    for i, text in enumerate(texts):
        lines = wrap_lines(text, ttf, width)[:max_lines]
        page = Image.new("L", (image_size, image_size), 255)
        draw = ImageDraw.Draw(page)
        for row, line in enumerate(lines):
            # anchor "la": (x, y) is the left end of the ascender line, so the glyph box
            # of row r spans [margin + r * pitch, margin + r * pitch + ascent + descent).
            draw.text((margin, margin + row * pitch), line, fill=0, font=ttf, anchor="la")
        images[i] = np.asarray(page)[:, :, None]  # grey -> identical R, G, B
        drawn.append(" ".join(lines))
    return images, drawn
