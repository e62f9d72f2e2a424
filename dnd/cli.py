"""`python -m dnd <stage> --config EXP.yaml ...`: one sub-command per Snakemake rule.

Every stage reads the validated experiment config and takes its input and output
paths as arguments (the rules pass them from their `input:`/`output:`), so no path is
hard-coded here. Each job is one MLflow run (`dnd.tracking`), marked FAILED when the
stage raises.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dnd.config import ConfigError, load


def _base(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--config", required=True, type=Path, help="experiment YAML (experiments/<exp>.yaml)")
    return p


def _processes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, default=1,
                   help="training processes, one per GPU: more than 1 re-runs this command under "
                        "`torchrun --standalone --nproc_per_node N` (DDP or FSDP, see train.parallel)")


def _relaunch_under_torchrun(processes: int, argv: list[str]) -> None:
    """Replace this process by torchrun running the same stage in `processes` processes."""
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={processes}", "-m", "dnd", *argv])


def _variant(cfg: dict, section: str, name: str) -> dict:
    if name not in cfg[section]:
        raise ConfigError(f"{section}: no variant {name!r} in the experiment; defined: {sorted(cfg[section])}")
    return cfg[section][name]


def _is_text(cfg: dict) -> bool:
    return cfg["data"]["source"] == "text"


def _device(cfg: dict):
    from dnd.runtime import resolve_device
    return resolve_device(cfg["device"])


def cmd_prepare_data(args, cfg):
    from dnd.data import prepare_data
    from dnd.tracking import job_tracker
    with job_tracker(cfg, "prepare_data", params=cfg["data"]) as t:
        summary = prepare_data(cfg["data"], args.out, seed=cfg["seed"], tracker=t)
        t.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})


def cmd_reference_stats(args, cfg):
    from dnd.metrics.evaluate import reference_features
    from dnd.tracking import job_tracker
    with job_tracker(cfg, "reference_stats", args.split_dir.name, params=cfg["evaluate"]["fid"]):
        reference_features(args.split_dir, args.out, eval_cfg=cfg["evaluate"], device=_device(cfg))


def cmd_train_tokenizer(args, cfg):
    from dnd.tokenizer.train import train_tokenizer
    from dnd.tracking import job_tracker
    tok = _variant(cfg, "tokenizers", args.tokenizer)
    with job_tracker(cfg, "train_tokenizer", args.tokenizer, params=tok) as t:
        train_tokenizer(cfg, args.tokenizer, args.data, args.out, device=_device(cfg), tracker=t)
        t.log_artifact(args.out.parent / "train_log.csv")


def cmd_reconstruct(args, cfg):
    from dnd.tokenizer.train import reconstruct
    from dnd.tracking import job_tracker
    tok = _variant(cfg, "tokenizers", args.tokenizer)
    with job_tracker(cfg, "reconstruct", args.tokenizer, params=tok) as t:
        metrics = reconstruct(args.model, args.data, args.out, device=_device(cfg))
        t.log_metrics(_numbers(metrics))


def cmd_extract_codes(args, cfg):
    from dnd.codes import extract_codes
    from dnd.tracking import job_tracker
    _variant(cfg, "tokenizers", args.tokenizer)
    ex = cfg["extract"]
    with job_tracker(cfg, "extract_codes", args.tokenizer, params=ex):
        extract_codes(args.model, args.data, args.out, ten_crop=ex["ten_crop"] and not args.single_view,
                      batch_size=ex["batch_size"],
                      shard_size=ex["shard_size"], device=_device(cfg))


def cmd_train_generator(args, cfg):
    from dnd.data import load_split
    from dnd.generators.train import train_generator
    from dnd.tracking import job_tracker
    gen = _variant(cfg, "generators", args.generator)
    num_classes = load_split(args.data).manifest["num_classes"]
    with job_tracker(cfg, "train_generator", args.generator, params=gen,
                     extra_tags={"kind": gen["kind"], "tokenizer": gen["tokenizer"]}) as t:
        train_generator(cfg, args.generator, args.codes, args.out, num_classes=num_classes,
                        device=_device(cfg), tracker=t, tokenizer_path=args.tokenizer_model)
        t.log_artifact(args.out.parent / "losses.csv")


def cmd_heldout_loss(args, cfg):
    from dnd.generators.heldout import heldout_loss
    from dnd.tracking import job_tracker
    gen = _variant(cfg, "generators", args.generator)
    with job_tracker(cfg, "heldout_loss", args.generator, params=gen,
                     extra_tags={"generator": args.generator, "kind": gen["kind"]}) as t:
        result = heldout_loss(args.model, args.codes, args.train_codes, args.out,
                              batch_size=gen["train"]["batch_size"], device=_device(cfg))
        t.log_metrics({**_numbers(result), **{f"val_ce_d{k}": v for k, v in enumerate(result["val_ce_per_depth"])}})


def cmd_sample(args, cfg):
    from dnd.generators.sample import sample
    from dnd.tracking import job_tracker
    gen = _variant(cfg, "generators", args.generator)
    sampler = _variant(cfg, "samplers", args.sampler)
    with job_tracker(cfg, "sample", f"{args.generator}/{args.sampler}", params=sampler,
                     extra_tags={"generator": args.generator, "sampler": args.sampler, "kind": gen["kind"]}) as t:
        sample(args.model, args.tokenizer_model, sampler, args.out, device=_device(cfg), tracker=t)


def cmd_evaluate(args, cfg):
    from dnd.metrics import evaluate as ev
    from dnd.tracking import job_tracker
    kw = dict(eval_cfg=cfg["evaluate"], is_text=_is_text(cfg), device=_device(cfg))
    if args.what == "samples":
        variant = f"{args.samples.parent.name}/{args.samples.name}"
        with job_tracker(cfg, "evaluate", variant, params=cfg["evaluate"],
                         extra_tags={"generator": args.samples.parent.name, "sampler": args.samples.name}) as t:
            ev.evaluate_samples(args.samples, args.ref, args.data, args.out, tracker=t, **kw)
    elif args.what == "tokenizer":
        with job_tracker(cfg, "evaluate", args.tokenizer, params=cfg["evaluate"],
                         extra_tags={"tokenizer": args.tokenizer}) as t:
            ev.evaluate_tokenizer(args.recon, args.data, args.ref, args.out, tracker=t, **kw)
    else:
        with job_tracker(cfg, "evaluate", "reference", params=cfg["evaluate"]) as t:
            ev.evaluate_reference(args.data, args.train_data, args.out, tracker=t, val_ref=args.ref,
                                  train_ref=args.train_ref, **kw)


def cmd_depth_cost(args, cfg):
    from dnd.config import depth_cost_plan
    from dnd.data import load_split
    from dnd.generators.speed import depth_cost
    from dnd.tracking import job_tracker
    num_classes = load_split(args.data).manifest["num_classes"]
    with job_tracker(cfg, "depth_cost", params=depth_cost_plan(cfg)) as t:
        depth_cost(cfg, args.out, num_classes=num_classes, device=_device(cfg), tracker=t)


def cmd_report(args, cfg):
    from dnd.report.render import render_report
    from dnd.tracking import job_tracker
    with job_tracker(cfg, "report", params=cfg["report"]) as t:
        render_report(cfg, args.results, args.out, benchmarks_dir=args.benchmarks)
        t.log_artifact(args.out / "report.html")
        t.log_artifact(args.out / "report.pdf")


def _numbers(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dnd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = _base(sub, "validate", "validate an experiment config and print it with defaults filled in")
    p.set_defaults(func=lambda a, c: print(json.dumps(c, indent=2)))

    p = _base(sub, "prepare_data", "render/import the images and write the train and val splits")
    p.add_argument("--out", required=True, type=Path, help="data folder (gets train/ and val/)")
    p.set_defaults(func=cmd_prepare_data)

    p = _base(sub, "reference_stats", "Inception features of a real split, cached for every FID")
    p.add_argument("--split-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="features .npz")
    p.set_defaults(func=cmd_reference_stats)

    p = _base(sub, "train_tokenizer", "train one RQ-VAE tokenizer variant (resumes from resume.pt)")
    p.add_argument("--tokenizer", required=True, help="tokenizer variant name")
    p.add_argument("--data", required=True, type=Path, help="training split folder")
    p.add_argument("--out", required=True, type=Path, help="model.pt")
    _processes(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = _base(sub, "reconstruct", "reconstruct a split with a tokenizer; PSNR, SSIM, code usage")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=cmd_reconstruct)

    p = _base(sub, "extract_codes", "encode a split into cached int16 codes (resumable by shard)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--single-view", action="store_true",
                   help="one plain view per image whatever extract.ten_crop says (val codes, for held-out losses)")
    p.set_defaults(func=cmd_extract_codes)

    p = _base(sub, "train_generator", "train one generator variant on cached codes (resumes from resume.pt)")
    p.add_argument("--generator", required=True)
    p.add_argument("--codes", required=True, type=Path, help="codes folder of the training split")
    p.add_argument("--data", required=True, type=Path, help="training split folder (for the class count)")
    p.add_argument("--tokenizer-model", type=Path, default=None, help="tokenizer model.pt (rqt soft targets)")
    p.add_argument("--out", required=True, type=Path, help="model.pt")
    _processes(p)
    p.set_defaults(func=cmd_train_generator)

    p = _base(sub, "heldout_loss", "a generator's cross-entropy on the val split's codes and on as many train codes")
    p.add_argument("--generator", required=True)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--codes", required=True, type=Path, help="codes folder of the val split")
    p.add_argument("--train-codes", required=True, type=Path, help="codes folder of the training split")
    p.add_argument("--out", required=True, type=Path, help="metrics .json")
    p.set_defaults(func=cmd_heldout_loss)

    p = _base(sub, "sample", "sample codes with a generator and decode them to images")
    p.add_argument("--generator", required=True)
    p.add_argument("--sampler", required=True)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--tokenizer-model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=cmd_sample)

    p = _base(sub, "evaluate", "FID family and OCR metrics of samples, reconstructions or real images")
    p.add_argument("what", choices=["samples", "tokenizer", "reference"])
    p.add_argument("--samples", type=Path, help="samples folder (samples)")
    p.add_argument("--recon", type=Path, help="reconstruction folder (tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer variant (tokenizer)")
    p.add_argument("--ref", type=Path, help="features .npz of the real split that --data names")
    p.add_argument("--train-ref", type=Path, help="training split features .npz (reference; optional)")
    p.add_argument("--data", required=True, type=Path, help="real split folder (train for samples, val otherwise)")
    p.add_argument("--train-data", type=Path, help="training split folder (reference)")
    p.add_argument("--out", required=True, type=Path, help="metrics .json")
    p.set_defaults(func=cmd_evaluate)

    p = _base(sub, "depth_cost", "sampling images/s of every generator kind at code depths 1, 2, 4, 8 on one "
                                 "backbone, random weights (evaluate.depth_cost)")
    p.add_argument("--data", required=True, type=Path, help="training split folder (for the class count)")
    p.add_argument("--out", required=True, type=Path, help="metrics .json")
    p.set_defaults(func=cmd_depth_cost)

    p = _base(sub, "report", "render the HTML and PDF comparison report of an experiment")
    p.add_argument("--results", required=True, type=Path, help="results/<exp>")
    p.add_argument("--benchmarks", type=Path, default=None, help="Snakemake benchmark folder")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.set_defaults(func=cmd_report)
    return parser


_REQUIRED = {"samples": ("samples", "ref"), "tokenizer": ("recon", "ref", "tokenizer"), "reference": ("train_data",)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage == "evaluate":
        missing = [f"--{k.replace('_', '-')}" for k in _REQUIRED[args.what] if getattr(args, k) is None]
        if missing:
            parser.error(f"evaluate {args.what} needs {' '.join(missing)}")
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "processes", 1) > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun
        _relaunch_under_torchrun(args.processes, sys.argv[1:] if argv is None else [str(a) for a in argv])
    args.func(args, cfg)
    return 0
