"""Generators: causality, KV-cache decoding == teacher forcing, guidance, sampling, presets, config errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from dnd import generators as G
from dnd.checkpoint import save_checkpoint
from torch._dynamo.utils import counters

from dnd.generators import sampling
from dnd.generators.backbone import KVCache
from dnd.generators.sampling import Sampler, position_index

V, GRID, DEPTH, CLASSES = 32, 4, 3, 5

# (kind, options) of every decoding variant; ids used in test names.
VARIANTS = {
    "dnd": ("dnd", {"n_layer": 3, "head_layers": [0, 1, 2]}),
    "dnd-default-heads": ("dnd", {}),
    "dnd-parallel": ("dnd", {"heads": "parallel"}),
    "ar1d-flat": ("ar1d", {"flatten": True}),
    "rqt": ("rqt", {"n_layer": 3, "depth_layers": 2}),
}
# Variants whose depth-k code of a position depends on that position's codes of depths < k.
DEPTH_CONDITIONED = ["dnd", "dnd-default-heads", "ar1d-flat", "rqt"]


def make(variant, *, num_classes=CLASSES, depth=DEPTH, seed=0):
    kind, options = VARIANTS[variant]
    torch.manual_seed(seed)
    model = G.build(kind, "tiny", depth=depth, codebook_size=V, grid=GRID, num_classes=num_classes, **options)
    # The real init zeroes the heads (all logits 0: every test below would pass trivially)
    # and gives near-tied logits; large random weights give clearly separated ones.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.normal_(1.0, 0.3)
    return model.eval()


def random_codes(batch=2, depth=DEPTH, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, GRID * GRID, depth), generator=g)


COND = torch.tensor([1, 4])




# ----------------------------------------------------------------------------- causality

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_positions_after_t_do_not_leak(variant):
    model = make(variant)
    codes = random_codes()
    with torch.no_grad():
        logits, _ = model(codes, COND)
        for t in (0, 5, 15):
            changed = codes.clone()
            changed[:, t:] = (changed[:, t:] + 7) % V
            other, _ = model(changed, COND)
            assert torch.allclose(other[:, :t], logits[:, :t], atol=1e-5), f"position < {t} saw positions >= {t}"
            if t + 1 < GRID * GRID:  # the next position does read position t
                assert not torch.allclose(other[:, t + 1], logits[:, t + 1], atol=1e-3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_depth_k_sees_only_lower_depths_of_its_position(variant):
    model = make(variant)
    codes = random_codes()
    t = 6
    with torch.no_grad():
        logits, _ = model(codes, COND)
        for j in range(DEPTH):
            changed = codes.clone()
            changed[:, t, j] = (changed[:, t, j] + 5) % V
            other, _ = model(changed, COND)
            for k in range(DEPTH):
                same = torch.allclose(other[:, t, k], logits[:, t, k], atol=1e-5)
                if j >= k or variant not in DEPTH_CONDITIONED:
                    assert same, f"depth {k} depends on the depth-{j} code of its own position"
                else:
                    assert not same, f"depth {k} ignores the depth-{j} code of its own position"


# ----------------------------------------------------------------------------- decoding

def guided_argmax(model, codes, cond, scale):
    with torch.no_grad():
        c, _ = model(codes, cond)
        u, _ = model(codes, torch.full_like(cond, model.num_classes))
    return (u + scale * (c - u)).argmax(-1)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_decoding_reproduces_teacher_forced_argmax(variant, static):
    model = make(variant)
    codes = model.generate(COND, sampler=Sampler(temperature=0), static=static)
    assert codes.shape == (2, GRID * GRID, DEPTH) and codes.dtype == torch.long
    with torch.no_grad():
        logits, _ = model(codes, COND)
    assert torch.equal(logits.argmax(-1), codes)
    # Guidance at every depth: the guided greedy codes are the argmax of guided teacher-forced logits.
    guided = model.generate(COND, sampler=Sampler(temperature=0, cfg_scale=2.5), static=static)
    assert torch.equal(guided_argmax(model, guided, COND, 2.5), guided)
    assert not torch.equal(guided, codes)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_weights_decode_like_teacher_forcing(variant, tmp_path):
    # The sample stage loads bf16 weights on a GPU (generators.load(dtype=)): caches, embeddings
    # and RoPE must all follow the weights' dtype, on both decode paths.
    model = make(variant)
    save_checkpoint({"config": {}, "model_args": model.model_args, "model": model.state_dict(), "step": 1},
                    tmp_path / "g.pt")
    model = G.load(tmp_path / "g.pt", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for static in (False, True):
        codes = model.generate(COND, sampler=Sampler(temperature=0), static=static)
        with torch.no_grad():
            assert torch.equal(model(codes, COND)[0].argmax(-1), codes)
        # Guidance amplifies bf16 rounding (u + s(c - u)): near-tied codes may flip, few others.
        guided = model.generate(COND, sampler=Sampler(temperature=0, cfg_scale=2.5), static=static)
        assert (guided_argmax(model, guided, COND, 2.5) == guided).float().mean() >= 0.95


@pytest.mark.parametrize("kind, options", [("dnd", {}), ("ar1d", {}), ("ar1d", {"flatten": True}), ("rqt", {})])
def test_unconditional_decoding(kind, options):
    depth = 1 if kind == "ar1d" and not options else 2
    torch.manual_seed(0)
    model = G.build(kind, "tiny", depth=depth, codebook_size=V, grid=GRID, num_classes=0, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    codes = model.generate(None, batch_size=3, sampler=Sampler(temperature=0))
    assert codes.shape == (3, GRID * GRID, depth)
    logits, _ = model(codes, None)
    assert torch.equal(logits.argmax(-1), codes)
    with pytest.raises(ValueError, match="unconditional"):
        model.generate(torch.tensor([0]))


@pytest.mark.parametrize("variant", ["dnd", "ar1d-flat", "rqt"])
def test_guidance_scale_one_is_the_conditional_model(variant):
    model = make(variant)
    for temperature in (0.0, 1.0):
        plain = model.generate(COND, sampler=Sampler(temperature=temperature, cfg_scale=1.0),
                               generator=torch.Generator().manual_seed(3))
        # Just above 1: the batched [cond; null] path runs, with (numerically) the conditional logits.
        batched = model.generate(COND, sampler=Sampler(temperature=temperature, cfg_scale=1.0 + 1e-6),
                                 generator=torch.Generator().manual_seed(3))
        assert torch.equal(plain, batched)
    # Scale 0 is the unconditional (null-label) model.
    null = torch.full_like(COND, CLASSES)
    assert torch.equal(model.generate(COND, sampler=Sampler(temperature=0, cfg_scale=0.0)),
                       model.generate(null, sampler=Sampler(temperature=0)))
    c, u = torch.randn(2, 3, V)
    policy = Sampler(cfg_scale=1.0).bind(1)
    assert torch.allclose(policy.guide(torch.cat([c, u])), c, atol=1e-6)


@pytest.mark.parametrize("variant", ["dnd", "ar1d-flat", "rqt"])
def test_same_seed_same_samples(variant):
    model = make(variant)
    sampler = Sampler(temperature=[1.0, 0.7, 1.3], top_k=[0, 8, 4], top_p=[0.9, 1.0, 0.8], cfg_scale=1.5)

    def sample(seed, static=False):
        return model.generate(COND, sampler=sampler, generator=torch.Generator().manual_seed(seed), static=static)

    a = sample(0)
    assert torch.equal(a, sample(0))
    assert torch.equal(a, sample(0, static=True))  # the static decode path makes the same draws
    assert not torch.equal(a, sample(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_steps_attend_over_the_filled_prefix_in_blocks(variant, monkeypatch):
    # Blocks of 5 slots over 16 positions: spans 5, 10, 15, then 16 (the cache's end).
    monkeypatch.setattr(sampling, "SPAN_BLOCK", 5)
    model = make(variant)
    spans = []
    update = KVCache.update

    def spy(cache, k, v, pos):
        keys, values, mask = update(cache, k, v, pos)
        if cache.k.shape[2] == model.num_steps:  # the sequence caches (not the RQ depth cache)
            spans.append((position_index(pos), keys.shape[2], mask.shape[-1]))
        return keys, values, mask

    monkeypatch.setattr(KVCache, "update", spy)
    sampler = Sampler(temperature=1.0, top_k=8, cfg_scale=2.0)
    static = model.generate(COND, sampler=sampler, generator=torch.Generator().manual_seed(0), static=True)
    steps = model.num_steps
    want = [min(steps, (s // 5 + 1) * 5) for s in range(steps)]
    per_layer = len(spans) // steps
    assert [n for _, n, _ in spans[::per_layer]] == want
    assert all(n == m for _, n, m in spans) and [int(i) for i, _, _ in spans[::per_layer]] == list(range(steps))
    monkeypatch.setattr(KVCache, "update", update)
    assert torch.equal(static, model.generate(COND, sampler=sampler, generator=torch.Generator().manual_seed(0)))


@pytest.mark.slow
def test_compiled_decoding_matches_eager(monkeypatch):
    # torch.compile of the static step (inductor on a CPU: about a minute to compile). Spans of
    # 2 slots: 8 spans over 16 positions, which must not cost 8 compilations.
    monkeypatch.setattr(sampling, "SPAN_BLOCK", 2)
    torch._dynamo.reset()
    counters.clear()
    model = make("dnd")
    sampler = Sampler(temperature=1.0, top_k=8, cfg_scale=2.0)
    eager = model.generate(COND, sampler=sampler, generator=torch.Generator().manual_seed(0))
    for call in range(2):  # the second call reuses the compiled step
        compiled = model.generate(COND, sampler=sampler, generator=torch.Generator().manual_seed(0), compile=True)
        assert torch.equal(compiled, eager)
        if call == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert 1 <= graphs < 8
    assert counters["stats"]["unique_graphs"] == graphs
    greedy = model.generate(COND, sampler=Sampler(temperature=0), compile=True)
    assert torch.equal(model(greedy, COND)[0].argmax(-1), greedy)


def test_generate_restores_training_mode_and_removes_caches():
    model = make("dnd").train()
    model.generate(COND, sampler=Sampler(temperature=0))
    assert model.training
    assert all(block.attn.cache is None for block in model.layers.blocks)


def test_kept_caches_are_reused_only_for_the_same_shape():
    stack = make("dnd").layers
    stack.setup_cache(2, 16, dtype=torch.float32, device=torch.device("cpu"))
    first = stack.blocks[0].attn.cache.k.data_ptr()
    stack.clear_cache(keep=True)
    assert stack.blocks[0].attn.cache is None
    stack.setup_cache(2, 16, dtype=torch.float32, device=torch.device("cpu"))
    assert stack.blocks[0].attn.cache.k.data_ptr() == first  # same addresses for captured graphs
    stack.clear_cache(keep=True)
    stack.setup_cache(4, 16, dtype=torch.float32, device=torch.device("cpu"))
    assert stack.blocks[0].attn.cache.k.shape[0] == 4
    stack.clear_cache()
    assert stack._kept_caches is None


# ----------------------------------------------------------------------------- sampling rules

def test_sampler_draws_follow_softmax_and_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])  # (1, 6)
    n = 40000
    rows = logits.expand(n, -1)
    probs = logits.softmax(-1)[0]

    def draw(**kw):
        policy = Sampler(**kw).bind(1)
        noise = policy.noise((n, 6), torch.Generator().manual_seed(0), torch.device("cpu"))
        return torch.bincount(policy.pick(rows, 0, noise), minlength=6).float() / n

    assert torch.allclose(draw(temperature=1.0), probs, atol=0.01)
    hot = logits.div(2.0).softmax(-1)[0]
    assert torch.allclose(draw(temperature=2.0), hot, atol=0.01)
    top3 = draw(top_k=3)
    assert top3[3:].sum() == 0 and torch.allclose(top3[:3], probs[:3] / probs[:3].sum(), atol=0.01)
    # top_p 0.8: the smallest set of best codes whose mass reaches 0.8 is {0, 1, 2} (0.60, 0.22, 0.13).
    nucleus = draw(top_p=0.8)
    assert nucleus[3:].sum() == 0 and nucleus[2] > 0
    # top-k first, then the nucleus of the renormalised top 2 (0.73, 0.27): p 0.7 keeps code 0 only.
    assert torch.equal(draw(top_k=2, top_p=0.7), torch.tensor([1.0, 0, 0, 0, 0, 0]))
    assert torch.equal(draw(top_k=1), torch.tensor([1.0, 0, 0, 0, 0, 0]))
    assert torch.equal(draw(temperature=0.0), torch.tensor([1.0, 0, 0, 0, 0, 0]))


def test_per_depth_settings_apply_to_their_depth():
    model = make("dnd")
    sampler = Sampler(temperature=[0.0, 1.0, 0.0])
    a = model.generate(COND, sampler=sampler, generator=torch.Generator().manual_seed(0))
    b = model.generate(COND, sampler=sampler, generator=torch.Generator().manual_seed(1))
    # Depth 0 is greedy given the past, so at position 0 (no past) both seeds agree; depth 1 is random.
    assert torch.equal(a[:, 0, 0], b[:, 0, 0])
    assert not torch.equal(a[:, :, 1], b[:, :, 1])
    with pytest.raises(ValueError, match="temperature: 2 values given for 3 code depths"):
        model.generate(COND, sampler=Sampler(temperature=[1.0, 1.0]))


# ----------------------------------------------------------------------------- presets, placement, config errors

PUBLISHED = {"B": 111e6, "L": 343e6, "XL": 775e6, "XXL": 1.4e9, "XXXL": 2.5e9}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_preset_parameter_counts_match_llamagen(size):
    with torch.device("meta"):  # counted without allocating
        model = G.build("dnd", size, depth=1, codebook_size=16384, grid=16, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / PUBLISHED[size] - 1) < 0.02, f"{size}: {n / 1e6:.1f}M parameters"


def test_head_placement_rule():
    assert G.default_head_layers(48, 2) == [39, 47]
    assert G.default_head_layers(48, 8) == [26, 29, 32, 35, 38, 41, 44, 47]
    assert G.default_head_layers(48, 1) == [47]
    assert G.default_head_layers(12, 4) == [8, 9, 10, 11]
    with torch.device("meta"):
        assert G.build("dnd", "XXL", depth=2, codebook_size=16, grid=2).head_layers == [39, 47]
        assert G.build("dnd", "XXL", depth=2, codebook_size=16, grid=2, heads="parallel").head_layers == [47, 47]


@pytest.mark.parametrize("kind, options, message", [
    ("dnd", {"head_layers": [0, 1]}, "2 heads given but the code depth is 3"),
    ("dnd", {"head_layers": [0, 1, 5]}, "layer index 5 is outside"),
    ("dnd", {"head_layers": [1, 0, 1]}, "non-decreasing"),
    ("dnd", {"heads": "parallel", "head_layers": [1, 1, 1]}, "parallel heads"),
    ("dnd", {"heads": "stacked"}, "spread"),
    ("ar1d", {}, "need flatten=True"),
    ("rqt", {"depth_layers": 2}, "no spatial layer"),
    ("rqt", {"head_layers": [0, 1, 1]}, "only applies to kind 'dnd'"),
    ("dnd", {"n_layers": 3}, "unknown option"),
    ("dnd", {"n_head": 3}, "not divisible"),
    ("dnd", {"dim": 36, "n_head": 2}, "divisible by 4"),
])
def test_config_errors(kind, options, message):
    with pytest.raises(ValueError, match=message):
        G.build(kind, "tiny", depth=DEPTH, codebook_size=V, grid=GRID, **options)


def test_input_errors_name_the_problem():
    model = make("dnd")
    with pytest.raises(ValueError, match=r"shape \(B, 16, 3\)"):
        model(random_codes(depth=2), COND)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model(random_codes() + V, COND)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        model(random_codes(), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="class-conditional"):
        model.generate(None, batch_size=2)


# ----------------------------------------------------------------------------- training-side behaviour

def test_loss_is_mean_of_per_depth_losses_and_positions_ignore_train_mode():
    model = G.build("dnd", "tiny", depth=2, codebook_size=V, grid=GRID, num_classes=CLASSES,
                    dropout=0.0, token_dropout=0.0, class_dropout=0.0)
    codes = random_codes(depth=2)
    model.train()
    logits_train, loss = model(codes, COND)
    per_depth = model.last_depth_losses
    assert per_depth.shape == (2,) and torch.allclose(loss, per_depth.mean())
    model.eval()
    logits_eval, _ = model(codes, COND)
    assert torch.allclose(logits_train, logits_eval)  # RoPE does not depend on self.training


def test_class_dropout_uses_the_null_label():
    model = G.build("dnd", "tiny", depth=1, codebook_size=V, grid=GRID, num_classes=CLASSES, class_dropout=1.0)
    rows = torch.tensor([0, 3])
    model.train()
    assert torch.equal(model.cond_emb(rows), model.cond_emb.table.weight[[CLASSES, CLASSES]])
    model.eval()
    assert torch.equal(model.cond_emb(rows), model.cond_emb.table.weight[[0, 3]])


def test_rqt_soft_targets():
    codebook = torch.randn(V, 8)
    codes = random_codes(depth=2)
    hard = make("rqt", depth=2)
    with pytest.raises(ValueError, match="needs the tokenizer's codebook"):
        G.build("rqt", "tiny", depth=2, codebook_size=V, grid=GRID, num_classes=CLASSES, soft_targets=0.5)(codes, COND)
    for temperature, close in ((1e-4, True), (5.0, False)):
        soft = G.build("rqt", "tiny", n_layer=3, depth_layers=2, depth=2, codebook_size=V, grid=GRID,
                       num_classes=CLASSES, soft_targets=temperature, codebook=codebook)
        soft.load_state_dict(hard.state_dict())  # the codebook is not part of the weights
        soft.eval()
        (_, h), (_, s) = hard(codes, COND), soft(codes, COND)
        assert torch.allclose(h, s, atol=1e-4) == close


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = G.build("dnd", "tiny", depth=2, codebook_size=V, grid=GRID, num_classes=CLASSES, dropout=0.0,
                    token_dropout=0.0, class_dropout=0.0)
    codes = random_codes(depth=2)
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.layers.activation_checkpointing = on
        model(codes, COND)[1].backward()
        grads.append(model.tok_emb.weight.grad.clone())
    assert torch.allclose(*grads, atol=1e-6)


@pytest.mark.parametrize("kind, options", [("dnd", {}), ("ar1d", {"flatten": True}), ("rqt", {})])
def test_tiny_model_memorises_four_sequences(kind, options):
    torch.manual_seed(0)
    grid, depth, vocab = 2, 2, 16
    model = G.build(kind, "tiny", depth=depth, codebook_size=vocab, grid=grid, num_classes=4, dropout=0.0,
                    token_dropout=0.0, class_dropout=0.0, **options)
    codes = torch.randint(0, vocab, (4, grid * grid, depth), generator=torch.Generator().manual_seed(5))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        opt.zero_grad()
        model(codes, labels)[1].backward()
        opt.step()
    assert torch.equal(model.generate(labels, sampler=Sampler(temperature=0)), codes)


def test_load_uses_ema_weights_strictly(tmp_path):
    model = G.build("rqt", "tiny", depth=2, codebook_size=V, grid=GRID, num_classes=CLASSES)
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    path = tmp_path / "model.pt"
    save_checkpoint({"config": {}, "model_args": model.model_args, "model": model.state_dict(), "ema": ema,
                     "step": 3}, path)
    loaded = G.load(path)
    assert not loaded.training and loaded.model_args == model.model_args
    assert json.loads(json.dumps(model.model_args)) == model.model_args
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())
    bad = dict(ema, **{"extra.weight": torch.zeros(1)})
    save_checkpoint({"config": {}, "model_args": model.model_args, "model": bad, "ema": bad, "step": 3}, path)
    with pytest.raises(RuntimeError, match="do not match"):
        G.load(path)


def test_chunked_bf16_cross_entropy_matches_fp32(monkeypatch):
    from dnd.generators import backbone
    monkeypatch.setattr(backbone, "CE_CHUNK_ROWS", 7)  # several chunks, the last one short
    torch.manual_seed(0)
    logits = (3 * torch.randn(50, 33)).to(torch.bfloat16)
    target = torch.randint(0, 33, (50,))
    a = logits.clone().requires_grad_()
    b = logits.float().clone().requires_grad_()
    ce_a = backbone.cross_entropy_rows(a, target)
    ce_b = F.cross_entropy(b, target, reduction="none")
    assert ce_a.dtype == torch.float32
    torch.testing.assert_close(ce_a, ce_b)
    weights = torch.rand(50)
    (ce_a * weights).sum().backward()
    (ce_b * weights).sum().backward()
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=1e-2, atol=1e-3)
