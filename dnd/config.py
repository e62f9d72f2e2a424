"""Experiment configuration: load a YAML file, validate it against the schema, fill defaults.

The schema (`workflow/schemas/experiment.schema.yaml`, shipped inside the package as
`dnd/experiment.schema.yaml`) is the one source of truth for every default. A
validated config is a plain dict of plain data (YAML is parsed with `safe_load`;
nothing is ever evaluated). Cross-field rules that JSON Schema cannot express
(heads equal to depth, image size divisible by the downsampling factor, ...) live in
`check_semantics`, so that a bad config is rejected before any job runs, naming the
key path and the reason.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "experiment.schema.yaml"


class ConfigError(ValueError):
    """A config that cannot be run; the message names the file, key path and reason."""


def _inline_refs(node: Any, defs: dict) -> Any:
    # The schema has no recursive $refs, so inlining them lets the default filler
    # see every `default` without a resolver.
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].split("/")[-1]
            merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
            return _inline_refs(merged, defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def load_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    return _inline_refs(schema, schema.get("$defs", {}))


def _default_filling_validator():
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate(raw: dict, *, source: str = "<config>") -> dict:
    """Validate `raw` (not modified) and return a copy with every default filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    cfg = copy.deepcopy(raw)
    validator = _default_filling_validator()(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_path(e)}: {e.message}" for e in errors[:10]]
        raise ConfigError(f"{source}: invalid experiment config:\n" + "\n".join(lines))
    check_semantics(cfg, source=source)
    return cfg


def load(path: str | Path) -> dict:
    """Load and validate an experiment YAML; `cfg['name']` is the file stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment config not found")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    cfg = validate(raw, source=str(path))
    cfg["name"] = path.stem
    return cfg


def downsample_factor(tok: dict) -> int:
    """Image pixels per code along each side of tokenizer config `tok`: every ch_mult level but
    the last halves the resolution, and a stride-2 stem halves it once more."""
    return 2 ** (len(tok["ch_mult"]) - 1) * int(tok.get("stem_stride", 1))


def code_depth(cfg: dict, gen: dict) -> int:
    tok_depth = cfg["tokenizers"][gen["tokenizer"]]["quantizer"]["depth"]
    return gen["code_depth"] or tok_depth


def depth_cost_plan(cfg: dict) -> dict:
    """What `evaluate.depth_cost` measures, resolved against the experiment: backbone, grid, sampler, batch.

    DnD models use the default head placement at every depth; the RQ-Transformer takes the
    depth_layers of the named generator, else of the experiment's first RQ-Transformer.
    """
    spec = cfg["evaluate"]["depth_cost"]
    gen_name = spec["generator"] or next(iter(cfg["generators"]))
    sampler_name = spec["sampler"] or next(iter(cfg["samplers"]))
    gen, sampler = cfg["generators"][gen_name], cfg["samplers"][sampler_name]
    tok = cfg["tokenizers"][gen["tokenizer"]]
    rqt = gen if gen["kind"] == "rqt" else next((g for g in cfg["generators"].values() if g["kind"] == "rqt"), None)
    backbone = {k: v for k, v in gen["overrides"].items() if k in ("n_layer", "n_head", "dim")}
    return {"generator": gen_name, "sampler": sampler_name, "size": gen["size"], "overrides": backbone,
            "depth_layers": rqt["depth_layers"] if rqt else 1,
            "grid": cfg["data"]["image_size"] // downsample_factor(tok),
            "codebook_size": tok["quantizer"]["codebook_size"],
            "sampling": {k: sampler[k] for k in ("temperature", "top_k", "top_p", "cfg_scale")},
            "depths": list(spec["depths"]), "kinds": list(spec["kinds"]),
            "batch_size": spec["batch_size"] or sampler["batch_size"], "repeats": spec["repeats"],
            "path": spec["path"]}


def check_semantics(cfg: dict, *, source: str = "<config>") -> None:
    """Cross-field rules; raises ConfigError naming the key path."""
    def fail(key: str, why: str):
        raise ConfigError(f"{source}: {key}: {why}")

    data = cfg["data"]
    if data["source"] == "image_folder":
        root = data["image_folder"]["root"]
        if not root:
            fail("data.image_folder.root", "required when data.source is image_folder")
        if not Path(root).is_dir():
            fail("data.image_folder.root", f"folder {root!r} does not exist")
    if data["source"] == "text" and data["text"]["corpus"] and not Path(data["text"]["corpus"]).is_file():
        fail("data.text.corpus", f"file {data['text']['corpus']!r} does not exist")
    for name, tok in cfg["tokenizers"].items():
        f = downsample_factor(tok)
        if data["image_size"] % f:
            fail(f"tokenizers.{name}.ch_mult",
                 f"image_size {data['image_size']} is not divisible by the downsampling factor {f} "
                 f"(ch_mult {tok['ch_mult']}, stem_stride {tok.get('stem_stride', 1)})")
        loss = tok["loss"]
        if loss["lpips_weight"] > 0 and not loss["lpips_path"]:
            fail(f"tokenizers.{name}.loss.lpips_path",
                 "lpips_weight > 0 needs a local LPIPS VGG weights file (nothing is downloaded)")
    for name, gen in cfg["generators"].items():
        key = f"generators.{name}"
        if gen["tokenizer"] not in cfg["tokenizers"]:
            fail(f"{key}.tokenizer", f"unknown tokenizer {gen['tokenizer']!r}; "
                 f"defined: {sorted(cfg['tokenizers'])}")
        tok_depth = cfg["tokenizers"][gen["tokenizer"]]["quantizer"]["depth"]
        depth = code_depth(cfg, gen)
        if depth > tok_depth:
            fail(f"{key}.code_depth", f"{depth} exceeds the tokenizer's depth {tok_depth}")
        if gen["head_layers"] is not None:
            if gen["kind"] != "dnd":
                fail(f"{key}.head_layers", "only DnD generators have depth heads")
            if len(gen["head_layers"]) != depth:
                fail(f"{key}.head_layers",
                     f"{len(gen['head_layers'])} heads given but the code depth is {depth}")
            from dnd.generators.backbone import PRESETS
            n_layer = gen["overrides"].get("n_layer", PRESETS[gen["size"]]["n_layer"])
            bad = [i for i in gen["head_layers"] if i >= n_layer]
            if bad:
                fail(f"{key}.head_layers", f"layer index {bad[0]} is beyond the {n_layer} layers of the model")
            if list(gen["head_layers"]) != sorted(gen["head_layers"]) or gen["head_layers"][-1] != n_layer - 1:
                fail(f"{key}.head_layers", f"must be non-decreasing and end at the last layer ({n_layer - 1})")
        if gen["kind"] == "ar1d" and not gen["flatten"] and depth != 1:
            fail(f"{key}.flatten", f"a 1-D AR over {depth}-deep codes must set flatten: true (or code_depth: 1)")
    depth_cost = cfg["evaluate"]["depth_cost"]
    for key, section in (("generator", "generators"), ("sampler", "samplers")):
        if depth_cost[key] is not None and depth_cost[key] not in cfg[section]:
            fail(f"evaluate.depth_cost.{key}", f"unknown {key} {depth_cost[key]!r}; defined: {sorted(cfg[section])}")
    for name, s in cfg["samplers"].items():
        for k in ("temperature", "top_k", "top_p"):
            if isinstance(s[k], list):
                for gname, gen in cfg["generators"].items():
                    if len(s[k]) not in (1, code_depth(cfg, gen)):
                        fail(f"samplers.{name}.{k}",
                             f"{len(s[k])} values but generator {gname} has code depth {code_depth(cfg, gen)}")


# Generator training settings that change how a run executes, not the weights it reaches:
# changing them neither re-runs a finished training (Snakemake params) nor discards its resume.pt.
GENERATOR_EXECUTION_KEYS = ("parallel", "compile", "activation_checkpointing", "ckpt_every", "log_every")


def generator_trajectory(gen: dict) -> dict:
    """A generator entry without its execution-only training keys (what its weights depend on)."""
    return {**gen, "train": {k: v for k, v in gen["train"].items() if k not in GENERATOR_EXECUTION_KEYS}}


def config_hash(obj: Any) -> str:
    """Short stable hash of plain data (sorted-key JSON)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
