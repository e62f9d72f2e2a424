"""Render an experiment's report: one self-contained HTML file, a PDF, and the figures.

The HTML embeds every table (pandas) and image (PNG as base64 data URIs) and fetches
nothing: its Content-Security-Policy allows only inline styles, data: images and one
inline script (pinned by its hash) that records, for the browser test, whether every
image decoded and whether anything was blocked. The PDF holds the same tables, figures
and sample grids (matplotlib PdfPages). Every file is written atomically.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from dnd.checkpoint import atomic_path, save_text
from dnd.report import plots
from dnd.report.tables import (PUBLISHED, Results, collect, hardware, load_published, published_caption,
                               published_table)

# Runs in the browser: marks <html> with data-images-loaded="ok/total" and
# data-csp-violations="n" once the page has loaded (read by tests/test_report.py).
CHECK_SCRIPT = (
    "(function(){var v=0;document.addEventListener('securitypolicyviolation',function(){v++;});"
    "window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);"
    "var ok=im.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;"
    "var r=document.documentElement;r.setAttribute('data-csp-violations',String(v));"
    "r.setAttribute('data-images-loaded',ok+'/'+im.length);});})();"
)
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       f"script-src 'sha256-{base64.b64encode(hashlib.sha256(CHECK_SCRIPT.encode()).digest()).decode()}'")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.55em; text-align: right; }
th { background: #f3f3f3; } td:nth-child(-n+2), th:nth-child(-n+2) { text-align: left; } td { white-space: nowrap; }
.table-wrap { overflow-x: auto; }
tr.published td { color: #555; background: #fafaf0; font-style: italic; }
img { max-width: 100%; } figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
.grids { display: flex; flex-wrap: wrap; gap: 1.2em; } .grids figure { width: 22em; }
.grids img { width: 100%; image-rendering: pixelated; }
.note { font-size: 0.88em; color: #555; } dt { font-weight: 600; } dd { margin: 0 0 0.5em 1.5em; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
"""

# Display names of table columns.
COLUMN_NAMES = {
    "source": "source", "name": "variant", "psnr": "PSNR (dB)", "ssim": "SSIM", "l2": "L2", "rfid": "rFID",
    "rocr": "rOCR", "cer": "CER", "usage": "code usage", "perplexity": "code perplexity",
    "rocr_text256": "rOCR Text256", "rocr_text512": "rOCR Text512", "rocr_arxiv512": "rOCR arXiv512",
    "fid": "FID", "kid_mean": "KID", "inception_score": "IS", "precision": "precision", "recall": "recall",
    "ppl_ocr": "PPL-OCR", "images_per_s": "images/s", "ms_per_step": "ms/step", "cfg_scale": "cfg",
    "num_samples": "samples", "codebook_size": "codebook", "train_seconds": "train time (s)",
    "train_peak_mb": "train peak RSS (MB)", "fid_vs_best": "FID / best", "max_rss_mb": "peak RSS (MB)",
    "seconds": "wall time (s)", "cpu_seconds": "CPU time (s)", "mean_load": "mean CPU load (%)",
    "train_ce": "train CE", "val_ce": "val CE", "ce_gap": "val - train", "val_ce_per_depth": "val CE per depth",
    "heldout_items": "images", "slowdown": "slowdown vs shallowest", "steps": "decode steps",
}
FIGURE_CAPTIONS = {
    "depth": "Reconstruction quality against code depth (validation split).",
    "generators": "FID (against training-set statistics) and PPL-OCR per generator; dashed: real-data bounds.",
    "speed": "Sampling throughput against code depth: every kind on one backbone with random weights (lines, "
             "the depth_cost stage) and the trained generators (black markers).",
    "losses": "Training cross-entropy per prediction head (one curve per code depth).",
    "stage_cost": "Wall time and peak memory of every job (Snakemake benchmark files).",
}


# ---- helpers -----------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if not np.isfinite(value) else f"{value:.4g}"
    return "–" if value is None else str(value)


def _display(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Keep the listed columns that exist and hold at least one value; readable names.

    Extractor names are cut before their parenthesised detail (the provenance section
    gives them in full).
    """
    keep = [c for c in columns if c in df and df[c].notna().any()]
    df = df[keep].copy()
    if "extractor" in df:
        df["extractor"] = [e.split(" (")[0] if isinstance(e, str) else e for e in df["extractor"]]
    return df.rename(columns=COLUMN_NAMES)


def _table_html(df: pd.DataFrame, table_id: str) -> str:
    """A DataFrame as an HTML table; published rows get class "published" (shaded)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    published = df["source"] == PUBLISHED if "source" in df else pd.Series(False, index=df.index)
    rows = "".join(
        ('<tr class="published">' if pub else "<tr>") + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row)
        + "</tr>" for row, pub in zip(df.itertuples(index=False), published))
    return (f'<div class="table-wrap"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{rows}</tbody></table></div>')


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}">'


# ---- content -----------------------------------------------------------------------


def _scale_of_samples(cfg: dict, res: Results) -> str:
    train = res.data.set_index("split")["images"].get("train")
    return f"{cfg['data']['image_size']} px {cfg['data']['source']}, vs {_fmt(train)} train"


def tokenizer_comparison(cfg: dict, res: Results) -> pd.DataFrame:
    ours = res.tokenizers.copy()
    val = res.data.set_index("split")["images"].get("val")
    ours["scale"] = f"{cfg['data']['image_size']} px {cfg['data']['source']}, {_fmt(val)} val"
    df = pd.concat([ours, published_table("tokenizers")], ignore_index=True)
    return _display(df, ["source", "name", "depth", "codes", "codebook_size", "psnr", "ssim", "l2", "rfid", "rocr",
                         "cer", "usage", "perplexity", "rocr_text256", "rocr_text512", "rocr_arxiv512", "scale",
                         "extractor"])


def generator_comparison(cfg: dict, res: Results) -> pd.DataFrame:
    ours = res.generators.copy()
    ours["scale"] = _scale_of_samples(cfg, res)
    df = pd.concat([ours, published_table("generators")], ignore_index=True)
    return _display(df, ["source", "name", "sampler", "kind", "size", "params", "codes", "cfg_scale", "temperature",
                         "fid", "kid_mean", "inception_score", "precision", "recall", "ppl_ocr",
                         "num_samples", "scale", "extractor", "device"])


def speed_comparison(cfg: dict, res: Results) -> pd.DataFrame:
    ours = res.speed.copy()
    ours.insert(0, "source", "this run")
    size = cfg["data"]["image_size"]
    ours["scale"] = [f"{size} px, batch {cfg['samplers'][s]['batch_size']}" for s in ours["sampler"]]
    df = pd.concat([ours, published_table("sampling_speed")], ignore_index=True)
    return _display(df, ["source", "name", "sampler", "kind", "size", "depth", "codes", "images_per_s",
                         "ms_per_step", "device", "scale"])


def depth_cost_note(plan: dict) -> str:
    """How the cost-of-depth rows were measured (empty plan: not measured yet)."""
    if not plan:
        return "Not measured yet (metrics/depth_cost.json is missing)."
    get = lambda key: plan.get(key, "?")  # noqa: E731 (a file from an older version may lack a key)
    backbone = ", ".join(f"{k} {v}" for k, v in plan.get("overrides", {}).items())
    guidance = f"guidance {plan['sampling']['cfg_scale']}" if plan.get("guided") else "no guidance"
    return (f"Random weights, {get('size')} backbone{f' ({backbone})' if backbone else ''} as generator "
            f"{get('generator')}, {get('grid')}x{get('grid')} codes, codebook {get('codebook_size')}, batch "
            f"{get('batch_size')}, {guidance}, {get('path')} decode path on {get('device')} "
            f"({get('torch_threads')} torch threads), mean of {get('repeats')} timed call(s). DnD predicts all D "
            f"codes of a position in one forward pass; the flattened 1-D AR takes D steps per position; the "
            f"RQ-Transformer ({get('depth_layers')} depth layer(s) taken from the backbone) runs D "
            f"depth-transformer steps per position. A decode step is one forward pass over the batch. All rows "
            f"come from one job, a few seconds apart, so their ratios hold when other jobs share the machine; "
            f"absolute images/s depend on that load.")


def headline(res: Results) -> list[str]:
    """A few sentences: which generator is better, by how much, at what cost."""
    lines = []
    cmp = res.comparison
    for sampler, group in cmp.groupby("sampler", sort=False):
        scored = group[group["fid"].notna()]
        if scored.empty:
            lines.append(f"Sampler {sampler}: no FID measured yet.")
            continue
        best = scored.iloc[0]
        others = ", ".join(f"{r['name']} {r['fid']:.4g} ({r['fid'] / best['fid'] - 1:+.0%})"
                           for _, r in scored.iloc[1:].iterrows())
        lines.append(f"Sampler {sampler}: lowest FID {best['name']} ({best['kind']}, depth {best['depth']}) "
                     f"at {best['fid']:.4g}" + (f"; {others}." if others else "."))
        fast = group[group["images_per_s"].notna()]
        if len(fast):
            row = fast.loc[fast["images_per_s"].idxmax()]
            lines.append(f"Fastest sampling with {sampler}: {row['name']} at {row['images_per_s']:.3g} images/s; "
                         + ", ".join(f"{r['name']} {r['images_per_s']:.3g}" for _, r in fast.iterrows()
                                     if r["name"] != row["name"]) + ".")
    trained = cmp.drop_duplicates("name")
    if trained["train_seconds"].notna().any():
        lines.append("Training time: " + ", ".join(f"{r['name']} {r['train_seconds']:.0f} s"
                                                   for _, r in trained.iterrows() if np.isfinite(r["train_seconds"]))
                     + ".")
    return lines


def provenance(cfg: dict, res: Results) -> dict[str, str]:
    """Scale, data, hardware and feature extractor behind the numbers."""
    data = cfg["data"]
    counts = ", ".join(f"{r.split} {_fmt(r.images)} images" for r in res.data.itertuples())
    source = data["source"]
    if source == "text":
        t = data["text"]
        source += (f" (corpus {t['corpus'] or 'CPython pydoc topics'}, font {t['font']} {t['font_size']} px, "
                   f"margin {t['margin']} px, at most {t['max_words']} words)")
    elif source == "image_folder":
        source += f" ({data['image_folder']['root']})"
    toks = "; ".join(f"{n}: depth {t['quantizer']['depth']}, N={t['quantizer']['codebook_size']}, "
                     f"{t['train']['steps']} steps x batch {t['train']['batch_size']}"
                     for n, t in cfg["tokenizers"].items())
    gens = "; ".join(f"{n}: {g['kind']} {g['size']}, {g['train']['steps']} steps x batch {g['train']['batch_size']}"
                     for n, g in cfg["generators"].items())
    samplers = "; ".join(f"{n}: {s['num_samples']} samples, temperature {s['temperature']}, cfg {s['cfg_scale']}"
                         for n, s in cfg["samplers"].items())
    hw = hardware()
    devices = sorted({str(d) for d in res.generators["device"].dropna()})
    ocr = cfg["evaluate"]["ocr"]
    few_samples = any(s["num_samples"] < 10000 for s in cfg["samplers"].values())
    return {
        "Data": f"{source}; {data['image_size']} px; {counts}",
        "Scale": f"tokenizers {toks or 'none'}. Generators {gens or 'none'}. Samplers {samplers or 'none'}.",
        "Hardware": (f"CPU {hw['cpu']}; GPU {hw['gpu']}; torch {hw['torch']}; Python {hw['python']}; "
                     f"{hw['platform']} (the machine that wrote this report; in a local run every stage ran "
                     f"here). Sampling device(s) recorded by the sample stage: {', '.join(devices) or 'unknown'}."
                     + (f" {cfg['report']['hardware_note']}" if cfg["report"]["hardware_note"] else "")),
        "FID feature extractor": (", ".join(res.extractors) or "not recorded")
        + ". gFID: generated samples against the training split; rFID: reconstructions of the validation "
          "split against the validation split."
        + (" FID from fewer than 10k images is biased upwards: compare variants within this report, not with "
           "the published 50k-sample numbers." if few_samples else ""),
        "OCR": (f"easyocr (English, offline models), at most {ocr['max_images']} images per set; rOCR = ROUGE-L F1 "
                f"against the ground-truth text; PPL-OCR = perplexity of the OCR text under a character "
                f"{ocr['ngram_order']}-gram model ({res.reference.get('ppl_lm') or 'fitted on the training text'}). "
                f"The paper OCRs with Qwen2-VL-72B, so only trends compare."
                if data["source"] == "text" and ocr["enabled"] else "no OCR metrics (not text data, or disabled)."),
        "Published rows": " ".join(f"{load_published()[k]['source']}: {load_published()[k]['scale']}."
                                   for k in ("tokenizers", "generators", "sampling_speed")),
    }


def build_figures(res: Results) -> dict[str, Figure]:
    return {
        "depth": plots.depth_figure(res.tokenizers, published_table("tokenizers")),
        "generators": plots.generators_figure(res.generators, res.reference),
        "speed": plots.speed_figure(res.speed, res.depth_cost),
        "losses": plots.losses_figure(res.losses),
        "stage_cost": plots.stage_cost_figure(res.stage_cost),
    }


# ---- writers -----------------------------------------------------------------------


def _html(cfg: dict, res: Results, tables: dict[str, pd.DataFrame], pngs: dict[str, bytes]) -> str:
    title = cfg["report"]["title"] or f"dnd experiment {cfg.get('name', '')}"
    prov = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in provenance(cfg, res).items())
    ref = res.reference
    grids = "".join(
        f"<figure>{_img(path.read_bytes(), f'samples {gen} {sampler}')}"
        f"<figcaption>{html.escape(gen)} &middot; sampler {html.escape(sampler)}</figcaption></figure>"
        for (gen, sampler), path in res.grids.items())
    missing = "".join(f"<li>{html.escape(m)}</li>" for m in res.missing)

    def figure(name: str) -> str:
        return (f"<figure>{_img(pngs[name], name)}<figcaption>{html.escape(FIGURE_CAPTIONS[name])}</figcaption>"
                f"</figure>")

    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(cfg.get('description', ''))}</p>",
        "<h2>Which generator is better, by how much, at what cost</h2>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in headline(res)) + "</ul>",
        _table_html(tables["comparison"], "comparison"),
        "<h2>How these numbers were measured</h2>",
        f"<dl>{prov}</dl>",
        "<h2>Tokenizers</h2>",
        "<p class='note'>Rows labelled <em>published</em> are the papers' numbers at their scale (see the scale "
        "column), never results of this run.</p>",
        _table_html(tables["tokenizers"], "tokenizers"),
        f"<p class='note'>{html.escape(published_caption('tokenizers'))}</p>",
        figure("depth"),
        "<h2>Generators</h2>",
        f"<p class='note'>Real-data bounds of this run: FID val vs train {_fmt(ref['fid_val_vs_train'])}, "
        f"rOCR of real images {_fmt(ref['rocr_real'])}, PPL-OCR of real images {_fmt(ref['ppl_ocr_real'])} "
        f"(perplexity of the clean ground-truth text {_fmt(ref['ppl_text'])}).</p>",
        _table_html(tables["generators"], "generators"),
        f"<p class='note'>{html.escape(published_caption('generators'))}</p>",
        figure("generators"),
        "<h2>Sampling speed</h2>",
        _table_html(tables["speed"], "speed"),
        f"<p class='note'>{html.escape(published_caption('sampling_speed'))}</p>",
        "<h3>The cost of code depth</h3>",
        f"<p class='note'>{html.escape(depth_cost_note(res.depth_cost_plan))}</p>",
        _table_html(tables["depth_cost"], "depth_cost"),
        figure("speed"),
        "<h2>Training losses</h2>",
        figure("losses"),
        "<p class='note'>Cross-entropy in nats per code, eval mode, on every validation image's codes and on as "
        "many training images' codes: a val loss far above the train loss means the generator memorised its "
        "training codes, and then a low FID against the training split flatters it.</p>",
        _table_html(tables["heldout"], "heldout"),
        "<h2>Samples</h2>",
        f"<div class='grids'>{grids or '<p>no sample grids yet</p>'}</div>",
        "<h2>Cost per stage</h2>",
        _table_html(tables["stage_cost"], "stage_cost"),
        figure("stage_cost"),
        "<h2>Configuration</h2>",
        f"<details><summary>resolved experiment config</summary><pre>"
        f"{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre></details>",
    ]
    if missing:
        sections += ["<h2>Missing inputs</h2>", f"<ul class='note'>{missing}</ul>"]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n"
        f"<script>{CHECK_SCRIPT}</script>\n</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def _text_page(title: str, lines: dict[str, str]) -> Figure:
    import textwrap

    fig = Figure(figsize=(8.27, 11.69))
    text = "\n\n".join(f"{k}:\n" + textwrap.fill(v, 100) for k, v in lines.items())
    fig.text(0.06, 0.95, title, fontsize=14, va="top", weight="bold")
    fig.text(0.06, 0.91, text, fontsize=7.5, va="top", family="monospace")
    return fig


def _write_pdf(path: Path, cfg: dict, res: Results, tables: dict[str, pd.DataFrame],
               figures: dict[str, Figure]) -> None:
    title = cfg["report"]["title"] or f"dnd experiment {cfg.get('name', '')}"
    summary = {"Summary": " ".join(headline(res)) or "no results yet", **provenance(cfg, res),
               "Cost of code depth": depth_cost_note(res.depth_cost_plan)}
    with atomic_path(path) as tmp:
        with PdfPages(tmp, metadata={"Title": title, "CreationDate": None}) as pdf:
            pdf.savefig(_text_page(title, summary))
            for name, caption in [("comparison", "Which generator is better, by how much, at what cost"),
                                  ("tokenizers", "Tokenizers (published rows: the papers' scale)"),
                                  ("generators", "Generators (published rows: the papers' scale)"),
                                  ("speed", "Sampling speed"),
                                  ("depth_cost", "The cost of code depth (random weights, one backbone)"),
                                  ("heldout", "Held-out cross-entropy (nats per code, eval mode)"),
                                  ("stage_cost", "Cost per stage")]:
                pdf.savefig(plots.table_figure(tables[name], caption))
            for name, fig in figures.items():
                fig.suptitle(FIGURE_CAPTIONS[name], fontsize=9)
                pdf.savefig(fig)
            for (gen, sampler), grid in res.grids.items():
                pdf.savefig(plots.image_figure(grid, f"samples: {gen}, sampler {sampler}"))


def render_report(cfg: dict, results_dir: Path, out_dir: Path, *, benchmarks_dir: Path | None = None) -> None:
    """Write out_dir/report.html, out_dir/report.pdf and out_dir/figures/<name>.png.

    `cfg` is the validated experiment config; `results_dir` is results/{exp};
    `benchmarks_dir` holds Snakemake's benchmark files ({rule}/{variant}.tsv), or None.
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    res = collect(cfg, results_dir, benchmarks_dir=Path(benchmarks_dir) if benchmarks_dir else None)
    tables = {
        "comparison": _display(res.comparison, ["name", "sampler", "kind", "depth", "fid", "fid_vs_best", "ppl_ocr",
                                                "images_per_s", "train_seconds", "train_peak_mb"]),
        "tokenizers": tokenizer_comparison(cfg, res),
        "generators": generator_comparison(cfg, res),
        "speed": speed_comparison(cfg, res),
        "heldout": _display(res.heldout, ["name", "kind", "tokenizer", "depth", "train_ce", "val_ce", "ce_gap",
                                          "val_ce_per_depth", "heldout_items"]),
        "depth_cost": _display(res.depth_cost, ["kind", "depth", "steps", "params", "images_per_s", "ms_per_step",
                                                "slowdown"]),
        "stage_cost": _display(res.stage_cost, ["rule", "variant", "seconds", "max_rss_mb", "cpu_seconds",
                                                "mean_load"]),
    }
    figures = build_figures(res)
    pngs = {name: _png_bytes(fig) for name, fig in figures.items()}
    for name, png in pngs.items():
        with atomic_path(out_dir / "figures" / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    save_text(_html(cfg, res, tables, pngs), out_dir / "report.html")
    _write_pdf(out_dir / "report.pdf", cfg, res, tables, figures)
