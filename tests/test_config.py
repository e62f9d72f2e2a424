"""Config validation: defaults from the schema, and bad configs rejected naming the key path."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dnd.config import ConfigError, config_hash, load, validate

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "data": {"source": "text", "image_size": 32},
    "tokenizers": {"d2": {"quantizer": {"depth": 2, "codebook_size": 64}, "ch_mult": [1, 2, 2]}},
    "generators": {"g": {"kind": "dnd", "tokenizer": "d2", "size": "tiny"}},
    "samplers": {"s": {"temperature": 1.0}},
}


def test_defaults_filled_without_touching_input():
    raw = copy.deepcopy(BASE)
    cfg = validate(raw)
    assert raw == BASE
    assert cfg["seed"] == 0
    assert cfg["data"]["text"]["font"] == "DejaVuSans.ttf"
    assert cfg["tokenizers"]["d2"]["train"]["steps"] == 1000
    assert cfg["tokenizers"]["d2"]["quantizer"]["shared_codebook"] is True
    assert cfg["generators"]["g"]["train"]["betas"] == [0.9, 0.95]
    assert cfg["evaluate"]["fid"]["enabled"] is True


def _mutated(path: str, value):
    cfg = copy.deepcopy(BASE)
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return cfg


@pytest.mark.parametrize("path,value,expect", [
    ("data.colour", "red", "data: Additional properties are not allowed ('colour'"),
    ("tokenizers.d2.train.steps", "many", "tokenizers.d2.train.steps: 'many' is not of type 'integer'"),
    ("tokenizers.d2.quantizer.codebook_size", 70000, "tokenizers.d2.quantizer.codebook_size: 70000 is greater than the maximum"),
    ("generators.g.head_layers", [1], "generators.g.head_layers: 1 heads given but the code depth is 2"),
    ("generators.g.head_layers", [0, 7], "generators.g.head_layers: layer index 7 is beyond"),
    ("data.image_size", 34, "tokenizers.d2.ch_mult: image_size 34 is not divisible by the downsampling factor 4"),
    ("data.text.corpus", "/nonexistent/corpus.txt", "data.text.corpus: file '/nonexistent/corpus.txt' does not exist"),
    ("generators.g.tokenizer", "d9", "generators.g.tokenizer: unknown tokenizer 'd9'"),
    ("generators.g.kind", "diffusion", "generators.g.kind: 'diffusion' is not one of"),
    ("tokenizers.d2.loss.lpips_weight", 1.0, "tokenizers.d2.loss.lpips_path: lpips_weight > 0 needs a local"),
    ("evaluate.depth_cost.generator", "big", "evaluate.depth_cost.generator: unknown generator 'big'; defined: ['g']"),
    ("evaluate.depth_cost.depths", [1, 0], "evaluate.depth_cost.depths.1: 0 is less than the minimum of 1"),
])
def test_bad_config_names_key(path, value, expect):
    with pytest.raises(ConfigError) as e:
        validate(_mutated(path, value), source="exp.yaml")
    assert expect in str(e.value)
    assert str(e.value).startswith("exp.yaml")


def test_missing_image_folder_root():
    cfg = copy.deepcopy(BASE)
    cfg["data"] = {"source": "image_folder", "image_folder": {"root": "/no/such/imagenet"}}
    with pytest.raises(ConfigError, match="data.image_folder.root: folder '/no/such/imagenet' does not exist"):
        validate(cfg)


def test_ar1d_on_deep_codes_needs_flatten():
    cfg = _mutated("generators.g.kind", "ar1d")
    with pytest.raises(ConfigError, match="generators.g.flatten"):
        validate(cfg)
    cfg["generators"]["g"]["flatten"] = True
    validate(cfg)


def test_config_hash_is_stable_and_sensitive():
    a = validate(BASE)
    b = validate(copy.deepcopy(BASE))
    assert config_hash(a) == config_hash(b)
    c = validate(_mutated("generators.g.train.lr", 0.01))
    assert config_hash(c["generators"]) != config_hash(a["generators"])
    assert config_hash(c["tokenizers"]) == config_hash(a["tokenizers"])


def test_load_sets_name_and_rejects_bad_yaml(tmp_path):
    p = tmp_path / "my-exp.yaml"
    p.write_text(yaml.safe_dump(BASE))
    assert load(p)["name"] == "my-exp"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load(bad)
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.yaml")


def test_yaml_values_are_data_not_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load(p)


def test_cli_rejects_bad_config_before_running(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(_mutated("generators.g.head_layers", [1])))
    r = subprocess.run([sys.executable, "-m", "dnd", "validate", "--config", str(p)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "generators.g.head_layers" in r.stderr


@pytest.mark.parametrize("stage", ["prepare_data", "reference_stats", "train_tokenizer", "reconstruct",
                                   "extract_codes", "train_generator", "heldout_loss", "sample", "evaluate",
                                   "depth_cost", "report"])
def test_every_stage_has_help(stage):
    r = subprocess.run([sys.executable, "-m", "dnd", stage, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--config" in r.stdout
