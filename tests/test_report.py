"""The report renders from synthetic results, and a real browser shows all of it offline.

Synthetic results (every file the pipeline would write for experiments/smoke.yaml)
are made in the test; the HTML is opened in headless Chromium, whose inline check
script (pinned in the report's Content-Security-Policy) records how many images
decoded and how many fetches the policy blocked. The PDF is read back with pypdf.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pypdf
import pytest
import yaml
from PIL import Image

from dnd.config import load
from dnd.report import render_report
from dnd.report.render import CSP, FIGURE_CAPTIONS
from dnd.report.tables import load_published

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIGURES = ["depth", "generators", "speed", "losses", "stage_cost"]
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _bench(path: Path, seconds: float, rss: float) -> None:
    _write(path, BENCH_HEADER + f"{seconds}\t0:00:{int(seconds):02d}\t{rss}\t0\t0\t0\t0\t0\t50.0\t{seconds * 0.9}\n")


def make_results(cfg: dict, root: Path, *, seed: int = 0) -> dict:
    """Every file the pipeline writes for cfg under root (results/{exp}); returns the FIDs used."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 512), ("val", 64)):
        _write(root / f"data/{split}/manifest.json", json.dumps(
            {"source": "text", "num_images": n, "image_size": cfg["data"]["image_size"], "num_classes": 0,
             "has_text": True, "skipped": 0}))
        _bench(root / f"benchmarks/reference_stats/{split}.tsv", 20.0, 900.0)
    _bench(root / "benchmarks/prepare_data/all.tsv", 5.0, 300.0)
    _write(root / "metrics/reference.json", json.dumps(
        {"ocr_rouge_l": 0.86, "ppl_ocr": 7.5, "ppl_text": 6.0, "fid_val_vs_train": 40.0,
         "extractor": "inception-v3-compat"}))
    for name, tok in cfg["tokenizers"].items():
        depth = tok["quantizer"]["depth"]
        _write(root / f"metrics/tokenizer/{name}.json", json.dumps(
            {"psnr": 14.0 + 2 * depth, "ssim": 0.5 + 0.05 * depth, "l2": 0.2 / depth, "rfid": 90.0 / depth,
             "rocr_rouge_l": 0.1 * depth, "rocr_cer": 1 - 0.1 * depth, "depth": depth,
             "codebook_size": tok["quantizer"]["codebook_size"], "extractor": "inception-v3-compat",
             "per_depth": [{"depth": d + 1, "usage": 0.8, "perplexity": 100.0, "psnr_partial": 14.0 + 2 * d}
                           for d in range(depth)]}))
        _write(root / f"tokenizer/{name}/train_log.csv", "step,loss\n0,1.0\n20,0.5\n")
        for rule in ("train_tokenizer", "reconstruct", "extract_codes", "evaluate_tokenizer"):
            _bench(root / f"benchmarks/{rule}/{name}.tsv", 30.0 * depth, 1200.0)
    # D codes per position: DnD one step, the flattened 1-D AR D steps, the RQ-Transformer D depth steps.
    sweep = [{"kind": kind, "depth": d, "steps": 64 * (d if kind == "ar1d" else 1), "params": 1_200_000 + d,
              "images_per_s": 200.0 / (d if kind == "ar1d" else 1 + (d - 1) * (kind == "rqt") / 4),
              "ms_per_step": 4.0} for kind in ("dnd", "ar1d", "rqt") for d in (1, 2, 4, 8)]
    _write(root / "metrics/depth_cost.json", json.dumps(
        {"plan": {"generator": "dnd", "sampler": "t1.0", "size": "small", "overrides": {}, "depth_layers": 1,
                  "grid": 8, "codebook_size": 512, "sampling": {"cfg_scale": 1.0}, "depths": [1, 2, 4, 8],
                  "kinds": ["dnd", "ar1d", "rqt"], "batch_size": 64, "repeats": 1, "path": "plain",
                  "num_classes": 0, "guided": False},
         "device": "cpu", "gpu": None, "torch_threads": 1, "rows": sweep}))
    _bench(root / "benchmarks/depth_cost/all.tsv", 12.0, 700.0)
    fids = {}
    for i, (name, gen) in enumerate(cfg["generators"].items()):
        depth = gen["code_depth"] or cfg["tokenizers"][gen["tokenizer"]]["quantizer"]["depth"]
        steps = np.arange(0, 300, 20)
        heads = {f"loss_d{d}": 5.0 * np.exp(-steps / 100) + d + rng.random(len(steps)) * 0.1 for d in range(depth)}
        lines = ["step,loss," + ",".join(heads) + ",lr"]
        lines += [f"{s},{sum(h[j] for h in heads.values()) / depth}," + ",".join(f"{h[j]:.4f}" for h in heads.values())
                  + ",0.001" for j, s in enumerate(steps)]
        _write(root / f"generators/{name}/losses.csv", "\n".join(lines) + "\n")
        _bench(root / f"benchmarks/train_generator/{name}.tsv", 100.0 + 10 * i, 1500.0)
        _write(root / f"metrics/heldout/{name}.json", json.dumps(
            {"train_ce": 2.0 + i, "val_ce": 3.5 + i, "gap": 1.5, "num_items": 64,
             "val_ce_per_depth": [3.0 + i + d for d in range(depth)], "train_ce_per_depth": [2.0] * depth}))
        for sampler in cfg["samplers"]:
            fids[(name, sampler)] = 100.0 + 10 * i
            _write(root / f"metrics/{name}/{sampler}.json", json.dumps(
                {"fid": fids[(name, sampler)], "kid_mean": 0.05, "precision": 0.4, "recall": 0.3,
                 "inception_score": None, "ppl_ocr": 20.0 + i, "num_samples": 64,
                 "extractor": "inception-v3-compat"}))
            sample_dir = root / f"samples/{name}/{sampler}"
            _write(sample_dir / "timing.json", json.dumps(
                {"images_per_s": 10.0 / depth, "ms_per_step": 2.0, "num_samples": 64, "device": "cpu"}))
            grid = (rng.random((66, 66, 3)) * 255).astype(np.uint8)
            Image.fromarray(grid).save(sample_dir / "grid.png")
            _bench(root / f"benchmarks/sample/{name}/{sampler}.tsv", 12.0, 800.0)
            _bench(root / f"benchmarks/evaluate_samples/{name}/{sampler}.tsv", 25.0, 1100.0)
    return fids


@pytest.fixture(scope="module")
def smoke_cfg():
    return load(ROOT / "experiments/smoke.yaml")


@pytest.fixture(scope="module")
def rendered(smoke_cfg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    results = tmp / "results/smoke"
    fids = make_results(smoke_cfg, results)
    out = tmp / "reports/smoke"
    render_report(smoke_cfg, results, out, benchmarks_dir=results / "benchmarks")
    return out, fids


def _table(html: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S).group(1)
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def test_html_is_self_contained(rendered):
    out, _ = rendered
    text = (out / "report.html").read_text()
    assert f'content="{CSP}"' in text
    assert not re.search(r"https?://", text), "the report must not reference anything outside the file"
    assert not re.search(r'(src|href)="(?!data:)', text), "every src/href must be a data: URI"
    assert text.count('<img src="data:image/png;base64,') == len(FIGURES) + 3  # figures + one grid per generator


def test_tables_hold_every_variant_beside_published_rows(rendered, smoke_cfg):
    out, fids = rendered
    text = (out / "report.html").read_text()
    rows = _table(text, "generators")
    header, body = rows[0], rows[1:]
    ours = [r for r in body if r[0] == "this run"]
    assert sorted(r[header.index("variant")] for r in ours) == sorted(smoke_cfg["generators"])
    for r in ours:
        assert float(r[header.index("FID")]) == pytest.approx(fids[(r[header.index("variant")], "t1.0")])
    published = [r for r in body if r[0] == "published"]
    assert len(published) == len(load_published()["generators"]["rows"])
    assert '<tr class="published"><td>published</td><td>DnD-XXL</td>' in text
    tok_rows = _table(text, "tokenizers")
    assert [r[1] for r in tok_rows[1:] if r[0] == "this run"] == list(smoke_cfg["tokenizers"])
    # the comparison table is sorted by FID: the best generator first
    cmp_rows = _table(text, "comparison")
    assert cmp_rows[1][0] == min(fids, key=fids.get)[0]
    # stage cost: one row per benchmark file
    n_bench = len(list((out.parents[1] / "results/smoke/benchmarks").rglob("*.tsv")))
    assert len(_table(text, "stage_cost")) - 1 == n_bench
    # provenance: extractor, hardware and data counts are stated; nothing was missing
    for needle in ("inception-v3-compat", "torch ", "train 512 images"):
        assert needle in text, needle
    assert "Missing inputs" not in text
    held = _table(text, "heldout")
    assert held[0][:7] == ["variant", "kind", "tokenizer", "depth", "train CE", "val CE", "val - train"]
    assert [r[0] for r in held[1:]] == list(smoke_cfg["generators"])
    assert [float(r[5]) for r in held[1:]] == [3.5 + i for i in range(len(smoke_cfg["generators"]))]
    cost = _table(text, "depth_cost")
    assert cost[0] == ["kind", "depth", "decode steps", "params", "images/s", "ms/step", "slowdown vs shallowest"]
    slowdown = {(r[0], int(r[1])): float(r[6]) for r in cost[1:]}
    assert len(slowdown) == 12
    assert slowdown[("ar1d (flattened)", 8)] == pytest.approx(8) and slowdown[("dnd", 8)] == pytest.approx(1)
    assert slowdown[("rqt", 8)] == pytest.approx(1 + 7 / 4)
    assert "small backbone as generator dnd, 8x8 codes, codebook 512, batch 64, no guidance, plain" in text


def test_figures_written_as_png(rendered):
    out, _ = rendered
    common = (ROOT / "workflow/rules/common.smk").read_text()
    declared = re.search(r"^REPORT_FIGURES = (\[.*\])$", common, re.M).group(1)
    assert yaml.safe_load(declared) == FIGURES == list(FIGURE_CAPTIONS), "the report rule declares these outputs"
    assert sorted(p.stem for p in (out / "figures").iterdir()) == sorted(FIGURES)
    for name in FIGURES:
        with Image.open(out / "figures" / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 100


def drawn_images(page) -> list[tuple[int, int]]:
    """(width, height) of the image XObjects a PDF page draws (matplotlib shares one resource dict)."""
    content = page.get_contents().get_data()
    xobjects = page["/Resources"].get("/XObject", {})
    images = {name: xobjects[name].get_object() for name in xobjects}
    return [(int(x["/Width"]), int(x["/Height"])) for name, x in images.items()
            if x.get("/Subtype") == "/Image" and f"{name} Do".encode() in content]


def test_pdf_has_pages_and_embedded_images(rendered):
    out, _ = rendered
    reader = pypdf.PdfReader(out / "report.pdf")
    # summary page + 7 tables + 5 figures + 3 sample grids
    assert len(reader.pages) == 1 + 7 + len(FIGURES) + 3
    assert "Which generator is better" in reader.pages[1].extract_text()
    assert "The cost of code depth" in reader.pages[5].extract_text()
    assert "Held-out cross-entropy" in reader.pages[6].extract_text()
    for page, name in zip(reader.pages[8:8 + len(FIGURES)], FIGURES):  # vector figures with their captions
        assert FIGURE_CAPTIONS[name][:30] in page.extract_text().replace("\n", " "), name
        assert not drawn_images(page)
    grid_pages = reader.pages[-3:]
    assert [drawn_images(page) for page in grid_pages] == [[(66, 66)]] * 3  # each grid at full resolution


def test_partial_results_render_and_list_what_is_missing(smoke_cfg, tmp_path):
    results = tmp_path / "results/smoke"
    make_results(smoke_cfg, results)
    (results / "metrics/rqt/t1.0.json").unlink()
    (results / "metrics/depth_cost.json").unlink()
    shutil.rmtree(results / "samples/ar1d")
    render_report(smoke_cfg, results, tmp_path / "out", benchmarks_dir=None)
    text = (tmp_path / "out/report.html").read_text()
    assert "Missing inputs" in text
    assert "metrics/rqt/t1.0.json (missing)" in text
    assert "samples/ar1d/t1.0/grid.png (missing)" in text
    assert "metrics/depth_cost.json (missing)" in text and "Not measured yet" in text
    assert text.count('<img src="data:image/png;base64,') == len(FIGURES) + 2


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    assert CHROMIUM, "the browser check needs Chromium: apt-get install -y --no-install-recommends chromium"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=120)


def _loaded_marks(dom: str) -> tuple[str, str]:
    images = re.search(r'data-images-loaded="([^"]*)"', dom)
    violations = re.search(r'data-csp-violations="([^"]*)"', dom)
    assert images and violations, f"the report's check script did not run; DOM head: {dom[:500]}"
    return images.group(1), violations.group(1)


def test_browser_loads_every_image_and_fetches_nothing(rendered, tmp_path):
    out, _ = rendered
    url = (out / "report.html").as_uri()
    dom = _chromium(url, tmp_path / "profile", "--dump-dom").stdout
    n = len(FIGURES) + 3
    assert _loaded_marks(dom) == (f"{n}/{n}", "0")
    shot = out / "report.png"
    _chromium(url, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,3000")
    with Image.open(shot) as im:
        assert im.size == (1280, 3000)
        assert len(set(im.convert("L").resize((64, 150)).getdata())) > 10  # not a blank page


def test_browser_check_catches_an_external_fetch(rendered, tmp_path):
    """The check can fail: an external image is blocked by the policy and counted."""
    out, _ = rendered
    bad = tmp_path / "bad.html"
    bad.write_text((out / "report.html").read_text().replace(
        "<h1>", '<img src="https://example.invalid/x.png" alt="external"><h1>', 1))
    dom = _chromium(bad.as_uri(), tmp_path / "profile", "--dump-dom").stdout
    loaded, violations = _loaded_marks(dom)
    n = len(FIGURES) + 3
    assert loaded == f"{n}/{n + 1}"
    assert int(violations) >= 1
