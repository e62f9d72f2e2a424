"""The cost-of-depth sweep (`depth_cost` stage): every kind at every depth on one backbone."""
import json

import pytest
import torch

from dnd.config import depth_cost_plan, validate
from dnd.generators import Sampler
from dnd.generators.speed import depth_cost, random_generator, time_generation

CFG = {
    "data": {"source": "text", "image_size": 32},  # 8x8 codes with ch_mult [1, 2, 2]
    "tokenizers": {"d2": {"quantizer": {"depth": 2, "codebook_size": 64}, "ch_mult": [1, 2, 2]}},
    "generators": {"g": {"kind": "dnd", "tokenizer": "d2", "size": "tiny", "overrides": {"n_layer": 3}},
                   "r": {"kind": "rqt", "tokenizer": "d2", "size": "tiny", "depth_layers": 2,
                         "overrides": {"n_layer": 3}}},
    "samplers": {"s": {"temperature": [1.0, 0.5], "cfg_scale": 2.0, "batch_size": 4}},
    "evaluate": {"depth_cost": {"depths": [1, 3], "batch_size": 2}},
}


def test_plan_takes_the_backbone_grid_and_sampler_from_the_experiment():
    plan = depth_cost_plan(validate(CFG))
    assert plan["generator"] == "g" and plan["size"] == "tiny" and plan["overrides"] == {"n_layer": 3}
    assert plan["depth_layers"] == 2  # from the experiment's RQ-Transformer
    assert (plan["grid"], plan["codebook_size"], plan["batch_size"]) == (8, 64, 2)
    assert plan["sampling"]["cfg_scale"] == 2.0 and plan["path"] == "auto"
    cfg = validate({**CFG, "evaluate": {"depth_cost": {"sampler": "s"}}})
    assert depth_cost_plan(cfg)["batch_size"] == 4 and depth_cost_plan(cfg)["depths"] == [1, 2, 4, 8]


def test_every_kind_at_every_depth_with_its_decode_steps(tmp_path):
    torch.set_num_threads(1)
    result = depth_cost(validate(CFG), tmp_path / "depth_cost.json", num_classes=5, device=torch.device("cpu"))
    assert json.loads((tmp_path / "depth_cost.json").read_text()) == result
    rows = {(r["kind"], r["depth"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((k, d) for k in ("dnd", "ar1d", "rqt") for d in (1, 3))
    for (kind, depth), row in rows.items():
        # one forward pass per position (DnD, RQ-Transformer's spatial steps) or per code (flattened 1-D AR)
        assert row["steps"] == 64 * (depth if kind == "ar1d" else 1), (kind, depth)
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0
    assert rows[("dnd", 3)]["params"] > rows[("dnd", 1)]["params"]  # a head and an embedding per depth
    assert result["plan"]["path"] == "plain" and result["plan"]["guided"] is True


@pytest.mark.parametrize("compile,warmup,calls", [(False, None, 2), (True, None, 3), (False, 1, 3)])
def test_time_generation_warms_up_then_times_the_repeats(compile, warmup, calls, monkeypatch):
    model = random_generator("dnd", "tiny", depth=2, grid=2, codebook_size=16, num_classes=3,
                             device=torch.device("cpu"))
    assert not model.training and all(p.any() for p in model.parameters() if p.ndim >= 2)
    seen = []
    monkeypatch.setattr(model, "generate", lambda cond, **kw: seen.append((tuple(cond.shape), kw["compile"])))
    seconds = time_generation(model, batch=5, sampler=Sampler(cfg_scale=2.0), compile=compile, repeats=2,
                              warmup=warmup)
    assert seconds >= 0 and seen == [((5,), compile)] * calls
