"""Choosing codes from logits: temperature, top-k, top-p, classifier-free guidance.

`Sampler` is the user-facing setting (plain numbers, one per depth where a list is
given). `Sampler.bind(depth, device)` turns it into a `DepthPolicy` whose per-depth
values are device tensors, so that a decode step picks codes without a host sync and
with static shapes (it can be captured by CUDA graphs / torch.compile).

Randomness comes from Gumbel noise drawn *outside* the step with the caller's
`torch.Generator`: `argmax(logits / T + g)` with g ~ Gumbel(0, 1) is a draw from
`softmax(logits / T)` (the Gumbel-max trick). The step itself is then deterministic,
so the eager and the captured decode paths give identical codes for the same noise,
and the same generator seed gives the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

Number = float | int


def _per_depth(name: str, value, depth: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * depth
    if len(values) != depth:
        raise ValueError(f"Sampler.{name}: {len(values)} values given for {depth} code depths "
                         f"(expected one value, or one per depth)")
    return values


@dataclass(frozen=True)
class Sampler:
    """How to pick codes. temperature 0 = greedy; top_k 0 = off; top_p 1 = off.

    Each of temperature / top_k / top_p may be a list with one value per code depth.
    `cfg_scale` s applies classifier-free guidance `u + s (c - u)` to the logits of every
    depth (every DnD head), c and u coming from one batched forward over [cond; null].
    s = 1 means no guidance (and no batch doubling).
    """

    temperature: Number | Sequence[Number] = 1.0
    top_k: int | Sequence[int] = 0
    top_p: Number | Sequence[Number] = 1.0
    cfg_scale: float = 1.0

    def bind(self, depth: int, device: torch.device | str = "cpu") -> "DepthPolicy":
        temps = [float(t) for t in _per_depth("temperature", self.temperature, depth)]
        top_k = [int(k) for k in _per_depth("top_k", self.top_k, depth)]
        top_p = [float(p) for p in _per_depth("top_p", self.top_p, depth)]
        for t in temps:
            if t < 0:
                raise ValueError(f"Sampler.temperature: {t} is negative (0 = greedy)")
        for k in top_k:
            if k < 0:
                raise ValueError(f"Sampler.top_k: {k} is negative (0 = off)")
        for p in top_p:
            if not 0 < p <= 1:
                raise ValueError(f"Sampler.top_p: {p} is outside (0, 1]")
        if self.cfg_scale < 0:
            raise ValueError(f"Sampler.cfg_scale: {self.cfg_scale} is negative")
        return DepthPolicy(temps, top_k, top_p, float(self.cfg_scale), torch.device(device))


def _at(table: torch.Tensor, depth: int | torch.Tensor) -> torch.Tensor:
    """table[depth] as a 0-dim tensor; a tensor depth is gathered on the device (no item(), graph-capturable)."""
    if isinstance(depth, torch.Tensor):
        return table.index_select(0, depth.reshape(1)).squeeze(0)
    return table[depth]


class DepthPolicy:
    """A `Sampler` bound to a code depth and a device; used inside decode steps."""

    def __init__(self, temps: list[float], top_k: list[int], top_p: list[float], cfg_scale: float,
                 device: torch.device):
        self.cfg_scale = cfg_scale
        # Python-level flags decide which ops run (static control flow for graph capture);
        # the per-depth values are tensors indexed by depth, so a tensor depth also works.
        self.stochastic = any(t > 0 for t in temps)
        self.use_top_k = any(k > 0 for k in top_k)
        self.use_top_p = any(p < 1 for p in top_p)
        self.temperature = torch.tensor(temps, dtype=torch.float32, device=device)  # (D,)
        self.top_k = torch.tensor(top_k, dtype=torch.long, device=device)  # (D,)
        self.top_p = torch.tensor(top_p, dtype=torch.float32, device=device)  # (D,)

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor | None:
        """Gumbel(0, 1) noise of `shape` (usually (B, codes per step, V)); None when all depths are greedy.

        Drawn on the generator's device (a CPU generator with a CUDA model works, but a
        generator on the model's device avoids a host-to-device copy per step).
        """
        if not self.stochastic:
            return None
        gen_device = generator.device if generator is not None else device
        u = torch.rand(shape, generator=generator, device=gen_device)
        # u in [tiny, 1): -log(-log u) is finite, so a masked (-inf) logit is never chosen.
        g = -torch.log(-torch.log(u.clamp_min_(torch.finfo(torch.float32).tiny)))
        return g.to(device, non_blocking=True)

    def guide(self, logits: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over a batch laid out as [cond; uncond]: (2B, V) -> (B, V)."""
        c, u = logits.float().chunk(2)
        return u + self.cfg_scale * (c - u)

    def pick(self, logits: torch.Tensor, depth: int | torch.Tensor,
             noise: torch.Tensor | None) -> torch.Tensor:
        """Codes (B,) int64 from logits (B, V) at code depth `depth` (int or 0-dim tensor).

        noise: (B, V) Gumbel noise from `DepthPolicy.noise`, or None when every depth is greedy.
        """
        logits = logits.float()
        greedy = logits.argmax(-1)  # (B,)
        if noise is None:
            return greedy
        temp = _at(self.temperature, depth)
        scaled = logits / temp.clamp_min(1e-6)  # (B, V)
        if self.use_top_k or self.use_top_p:
            scaled = self._filter(scaled, depth)
        drawn = (scaled + noise).argmax(-1)  # (B,)
        return torch.where(temp == 0, greedy, drawn)

    def _filter(self, scaled: torch.Tensor, depth: int | torch.Tensor) -> torch.Tensor:
        # One descending sort serves both filters; the highest-scoring code is always kept.
        vocab = scaled.shape[-1]
        ordered, order = scaled.sort(-1, descending=True)  # (B, V)
        keep = torch.ones_like(ordered, dtype=torch.bool)
        if self.use_top_k:
            k = _at(self.top_k, depth)
            k = torch.where(k > 0, k, vocab)
            keep &= torch.arange(vocab, device=scaled.device) < k
        if self.use_top_p:
            # As HF's warpers (the reference): the nucleus is taken after top-k, renormalised.
            probs = ordered.masked_fill(~keep, float("-inf")).softmax(-1)
            mass_before = probs.cumsum(-1) - probs  # (B, V) probability of all better codes
            keep &= mass_before < _at(self.top_p, depth)
        mask = torch.zeros_like(keep).scatter(-1, order, keep)  # back to vocabulary order
        return scaled.masked_fill(~mask, float("-inf"))


# Cache slots a static-shape step attends over come in blocks of this many, so one compiled
# graph serves each block of steps while a step reads at most SPAN_BLOCK - 1 unfilled slots.
SPAN_BLOCK = 32


class StaticPos(NamedTuple):
    """A static-shape decode step's place in the sequence.

    index: 0-dim device tensor, the sequence index written (the same graph serves every step).
    span: int, the cache slots attended over: the filled prefix rounded up to SPAN_BLOCK
      (`static_span`). Attending over the whole cache instead makes every step read the
      full-length keys and values, twice the bytes of the prefix on average; with a batch of
      250 and guidance on DnD-XXL that is 38 GB per step against 19 (benchmarks/RESULTS.md).
    """
    index: torch.Tensor
    span: int


def static_span(step: int, num_slots: int) -> int:
    return min(num_slots, (step // SPAN_BLOCK + 1) * SPAN_BLOCK)


def position_index(pos: int | StaticPos) -> int | torch.Tensor:
    """The sequence index of a decode step: an int (eager path) or a 0-dim tensor (static path)."""
    return pos.index if isinstance(pos, StaticPos) else pos


def compiled_step(model, on_cuda: bool):
    """The model's decode step under torch.compile, made once per model and reused.

    CUDA: mode "reduce-overhead" (the step is captured as CUDA graphs; caches are module
    buffers, so their addresses are fixed). Elsewhere: inductor's default mode (C++ code,
    about a minute to compile a small model on a CPU). Kept on the instance: a fresh
    torch.compile wrapper per call would recompile.
    """
    mode = "reduce-overhead" if on_cuda else "default"
    cache = model.__dict__.setdefault("_compiled_decode_steps", {})
    if mode not in cache:
        # dynamic=None: the first span compiles static, the second recompiles it as a symbolic
        # size, and later spans reuse that code (one CUDA graph recorded per span).
        cache[mode] = torch.compile(model._decode_step, mode=mode, fullgraph=True, dynamic=None)
    return cache[mode]


@torch.no_grad()
def decode(model, cond: torch.Tensor | None, *, batch_size: int | None = None, sampler: Sampler | None = None,
           generator: torch.Generator | None = None, compile: bool = False,
           static: bool | None = None) -> torch.Tensor:
    """Autoregressive decoding of any generator with its KV cache -> codes (B, grid*grid, depth) int64.

    cond: (B,) labels (the null label `num_classes` is allowed) or None with `batch_size`
    for an unconditional model. With `sampler.cfg_scale != 1` on a class-conditional
    model, every forward runs on the batch [cond; null] and every depth's logits are
    guided. Noise comes from `generator` (same seed, same codes).

    Two step implementations, same codes:
      static=False (default unless compiling): eager steps attending over the filled cache
        prefix, O(prefix) per step;
      static=True: static shapes (position as a device tensor, attention over the cache's
        first `static_span` slots with a length mask), what graph capture needs; on its own
        it runs eagerly (tests check its numerics).
    compile=True implies static and wraps the step in torch.compile (`compiled_step`); on
    CUDA the caches are then kept after the call (same addresses for the captured graphs,
    `model._clear_caches()` frees them).
    Runs in eval mode (dropout off) and restores the previous mode; bf16 autocast on CUDA.
    """
    static = compile if static is None else static
    if compile and not static:
        raise ValueError("compile=True needs the static-shape step (static=True or None)")
    sampler = sampler or Sampler()
    device = model.device
    rows = model.cond_emb.labels(cond, batch_size, device)  # (B,)
    B = rows.shape[0]
    policy = sampler.bind(model.depth, device)
    guided = model.num_classes > 0 and policy.cfg_scale != 1.0
    if guided:
        rows = torch.cat([rows, torch.full_like(rows, model.num_classes)])  # (2B,) [cond; null]
    on_cuda = device.type == "cuda"
    cache_dtype = torch.bfloat16 if on_cuda else next(model.parameters()).dtype
    step = compiled_step(model, on_cuda) if compile else model._decode_step
    graphs = compile and on_cuda
    positions = torch.arange(model.num_steps, device=device) if static else None
    out = torch.empty(B, model.num_steps, model.codes_per_step, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    model._setup_caches(rows.shape[0], dtype=cache_dtype, device=device)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            x = model.cond_emb(rows)[:, None]  # (B', 1, dim)
            for s in range(model.num_steps):
                noise = policy.noise((B, model.codes_per_step, model.codebook_size), generator, device)
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                pos = StaticPos(positions[s], static_span(s, model.num_steps)) if static else s
                codes, fed = step(x, pos, noise, policy, guided)  # (B, k), (B', k)
                out[:, s] = codes
                if s + 1 < model.num_steps:
                    x = model._step_input(fed, s)  # (B', 1, dim)
    finally:
        # CUDA graphs captured the cache addresses: keep the caches for the next call.
        model._clear_caches(keep=graphs)
        model.train(was_training)
    return out.view(B, model.seq_len, model.depth)
