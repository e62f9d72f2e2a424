"""The report's figures, built from the tables of `dnd.report.tables`.

Figures are `matplotlib.figure.Figure` objects made without pyplot, so rendering a
report never touches global backend state. Every function draws what the tables hold
and says on the axes what is absent, so a partial run still gives a readable figure.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.figure import Figure
from PIL import Image

KIND_MARKERS = {"dnd": "o", "ar1d": "s", "rqt": "^"}
PUBLISHED_STYLE = {"linestyle": "--", "alpha": 0.7}


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _has(df: pd.DataFrame, col: str) -> bool:
    return col in df and pd.to_numeric(df[col], errors="coerce").notna().any()


def _variant_labels(df: pd.DataFrame) -> list[str]:
    multi = df["sampler"].nunique() > 1
    return [f"{n}\n{s}" if multi else str(n) for n, s in zip(df["name"], df["sampler"])]


def depth_figure(tokenizers: pd.DataFrame, published: pd.DataFrame) -> Figure:
    """rOCR and PSNR of the reconstructions against code depth, with the published rOCR."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_rocr, ax_psnr = fig.subplots(1, 2)
    ours = tokenizers.sort_values("depth")
    if _has(ours, "rocr"):
        ax_rocr.plot(ours["depth"], ours["rocr"], "o-", label="this run (easyocr)")
    pub = published[published["depth"].notna() & published["name"].str.startswith("RQ-VAE")].sort_values("depth")
    for col, label in [("rocr_text256", "published, Text256"), ("rocr_text512", "published, Text512")]:
        rows = pub[pub[col].notna()]
        ax_rocr.plot(rows["depth"], rows[col], marker="x", label=f"{label} (Qwen2-VL OCR)", **PUBLISHED_STYLE)
    ax_rocr.set(xlabel="code depth D", ylabel="rOCR (ROUGE-L F1)", title="rOCR of reconstructions", ylim=(0, 1.02))
    ax_rocr.legend(fontsize=7)
    if _has(ours, "psnr"):
        ax_psnr.plot(ours["depth"], ours["psnr"], "o-", label="this run (each tokenizer, all its codes)")
        # decoding a deep tokenizer's first d codes: the residual refinement, depth by depth
        for row in ours.itertuples():
            partial = [p for p in (row.psnr_partial if isinstance(row.psnr_partial, list) else []) if np.isfinite(p)]
            if len(partial) > 1:
                ax_psnr.plot(range(1, len(partial) + 1), partial, ":", marker=".",
                             label=f"{row.name}: first d of its {len(partial)} codes")
        ax_psnr.set(xlabel="code depth D", ylabel="PSNR (dB)", title="PSNR of reconstructions (val)")
        ax_psnr.legend(fontsize=7)
    else:
        _empty(ax_psnr, "no tokenizer metrics yet")
    for ax in (ax_rocr, ax_psnr):
        depths = sorted(set(ours["depth"].dropna().astype(int)) | set(pub["depth"].dropna().astype(int)))
        if depths:
            ax.set_xticks(depths)
    return fig


def generators_figure(generators: pd.DataFrame, reference: dict) -> Figure:
    """FID and PPL-OCR per generator and sampler, with the real-data bounds as dashed lines."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_fid, ax_ppl = fig.subplots(1, 2)
    labels = _variant_labels(generators) if len(generators) else []
    x = np.arange(len(labels))
    for ax, col, ylabel, bound, bound_label in [
        (ax_fid, "fid", "FID (lower is better)", reference.get("fid_val_vs_train"), "val vs train"),
        (ax_ppl, "ppl_ocr", "PPL-OCR (lower is better)", reference.get("ppl_ocr_real"), "real images"),
    ]:
        if not _has(generators, col):
            _empty(ax, f"no {ylabel.split(' (')[0]} measured" + (" (not text data?)" if col == "ppl_ocr" else ""))
            continue
        values = pd.to_numeric(generators[col], errors="coerce")
        ax.bar(x, values, color=[f"C{i % 10}" for i in range(len(x))])
        for xi, v in zip(x, values):
            if np.isfinite(v):
                ax.annotate(f"{v:.3g}", (xi, v), ha="center", va="bottom", fontsize=7)
        if bound is not None and np.isfinite(bound):
            ax.axhline(bound, color="k", label=bound_label, **PUBLISHED_STYLE)
            ax.legend(fontsize=7)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set(ylabel=ylabel, title=ylabel.split(" (")[0] + " per generator")
    return fig


def speed_figure(speed: pd.DataFrame, depth_cost: pd.DataFrame) -> Figure:
    """Sampling throughput against code depth: the random-weight sweep of every kind on one
    backbone (lines) and the experiment's trained generators (markers)."""
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    sweep, trained = _has(depth_cost, "images_per_s"), _has(speed, "images_per_s")
    if not sweep and not trained:
        _empty(ax, "no sampling timings yet")
        return fig
    for i, (kind, rows) in enumerate(depth_cost.sort_values("depth").groupby("kind", sort=False) if sweep else []):
        ax.plot(rows["depth"], rows["images_per_s"], marker=KIND_MARKERS.get(kind.split()[0], "D"), color=f"C{i}",
                mfc="none", lw=1.2, label=f"{kind}, random weights")
    labelled = set()
    for row in speed.itertuples() if trained else []:
        kind = row.kind.split()[0]
        if np.isfinite(row.images_per_s):
            ax.scatter(row.depth, row.images_per_s, marker=KIND_MARKERS.get(kind, "D"), color="k", s=30, zorder=3,
                       alpha=0.7, label=None if kind in labelled else f"{kind}, trained (sample stage)")
            labelled.add(kind)
    depths = sorted({int(d) for df in (depth_cost, speed) if "depth" in df for d in df["depth"].dropna()})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.set(xlabel="code depth D", ylabel="images / s", title="Sampling throughput against code depth")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6)
    return fig


def losses_figure(losses: dict[str, pd.DataFrame]) -> Figure:
    """Training loss per head (loss_d0, loss_d1, ...) for every generator, one panel each."""
    n = max(len(losses), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    if not losses:
        _empty(axes[0], "no generator loss curves yet")
        return fig
    for ax, (name, df) in zip(axes, losses.items()):
        heads = [c for c in df.columns if c.startswith("loss_d")]
        for col in heads or ["loss"]:
            ax.plot(df["step"], df[col], label=col.replace("loss_", "head "), lw=1)
        ax.set(title=name, xlabel="step", ylabel="cross-entropy")
        ax.legend(fontsize=6)
    for ax in axes[len(losses):]:
        ax.set_visible(False)
    return fig


def stage_cost_figure(stage_cost: pd.DataFrame) -> Figure:
    """Wall time and peak memory of every job (Snakemake benchmark files)."""
    n = max(len(stage_cost), 1)
    fig = Figure(figsize=(9, 0.8 + 0.22 * n), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2, sharey=True)
    if stage_cost.empty:
        _empty(ax_t, "no benchmark files")
        _empty(ax_m, "no benchmark files")
        return fig
    labels = [f"{r} {v}" if v != "all" else r for r, v in zip(stage_cost["rule"], stage_cost["variant"])]
    y = np.arange(len(labels))
    ax_t.barh(y, stage_cost["seconds"], color="C0")
    ax_t.set_yticks(y, labels, fontsize=7)
    ax_t.invert_yaxis()
    ax_t.set(xlabel="wall time (s)", title=f"Wall time (sum over jobs {stage_cost['seconds'].sum():.0f} s, "
                                          f"CPU {stage_cost['cpu_seconds'].sum():.0f} s)")
    ax_m.barh(y, stage_cost["max_rss_mb"], color="C1")
    ax_m.set(xlabel="peak RSS (MB)", title="Peak memory")
    return fig


def image_figure(path: Path, title: str) -> Figure:
    """One sample grid as a PDF page (embedded as an image)."""
    image = np.asarray(Image.open(path).convert("RGB"))
    fig = Figure(figsize=(6, 6.4), layout="constrained")
    ax = fig.subplots()
    ax.imshow(image, interpolation="none")  # vector backends embed the PNG unresampled
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return fig


def table_figure(df: pd.DataFrame, title: str, *, max_rows: int = 28) -> Figure:
    """A DataFrame as a PDF page (rows past max_rows are cut, with a note)."""
    shown = df.head(max_rows)
    fig = Figure(figsize=(11, 1.2 + 0.25 * (len(shown) + 1)), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.set_title(title + (f" (first {max_rows} of {len(df)} rows)" if len(df) > max_rows else ""),
                 fontsize=10, loc="left")
    if shown.empty:
        _empty(ax, "no rows")
        return fig
    cells = [[_cell(v) for v in row] for row in shown.itertuples(index=False)]
    table = ax.table(cellText=cells, colLabels=[str(c) for c in shown.columns], loc="upper center",
                     cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(6)
    table.auto_set_column_width(list(range(len(shown.columns))))
    return fig


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."
