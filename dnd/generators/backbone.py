"""The LLaMA-style backbone shared by every generator (dnd-spec section 3).

Pre-norm blocks: RMSNorm (eps 1e-5), fused-QKV attention through
`F.scaled_dot_product_attention`, SwiGLU FFN with hidden size
`find_multiple(int(8 dim / 3), 256)`, bias-free linears, init N(0, 0.02).

Positions: 2-D RoPE over the code grid (LlamaGen layout: head_dim/4 frequencies
`10000^(-2j / (head_dim/2))`, the first head_dim/4 rotation pairs rotate by the row,
the last head_dim/4 by the column, adjacent channel pairs (2i, 2i+1)). A sequence is
[condition token, codes ...]; sequence index t >= 1 carries the grid coordinate of
the code it holds. Deliberate fix of the LlamaGen quirk: LG gives the condition token
cos = sin = 0, which zeroes its query and key; here it gets angle 0 (the identity
rotation, as if at the grid origin), so its key keeps its content. Positions never
depend on `self.training` (a reference pitfall): the same table serves training,
teacher-forced evaluation and decoding.

KV cache: `LayerStack.setup_cache` preallocates keys/values to the maximal length.
Two decode modes share the same code:
  * eager (position given as a Python int): the step writes its keys at `pos` and
    attends over the filled prefix `[:pos + 1]` only, no mask, O(prefix) per step;
  * static (position given as a `StaticPos`: a 0-dim device tensor and a span): keys
    are written with `index_copy_` and attention runs over the cache's first `span`
    slots (the filled prefix rounded up to a block) with a length mask, so every step
    of a block has the same shapes and can be captured by CUDA graphs
    (`torch.compile(mode="reduce-overhead")`). Caches are module buffers so the graph
    sees fixed addresses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dnd.generators.sampling import StaticPos, decode

# LlamaGen's GPT sizes (B..XXL) and the DnD reference's XXXL (48 x 2048, 32 heads; LG's
# own XXXL is 48 x 2560). tiny/small are for tests and smoke runs.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "dim": 64},
    "small": {"n_layer": 4, "n_head": 4, "dim": 128},
    "B": {"n_layer": 12, "n_head": 12, "dim": 768},
    "L": {"n_layer": 24, "n_head": 16, "dim": 1024},
    "XL": {"n_layer": 36, "n_head": 20, "dim": 1280},
    "XXL": {"n_layer": 48, "n_head": 24, "dim": 1536},
    "XXXL": {"n_layer": 48, "n_head": 32, "dim": 2048},
}

INIT_STD = 0.02
ROPE_BASE = 10000.0


CE_CHUNK_ROWS = 4096


def _ce_fp32(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, reduction="none")


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of logits (M, V) in fp32, without an fp32 copy of all M x V logits.

    Under bf16 autocast the logits are bf16; casting the whole (M, V) tensor to fp32 (and
    keeping its softmax for backward) doubles the largest activation of training at
    V = 16384. Chunks of rows are cast one at a time and recomputed in backward, so only
    the bf16 logits are kept.
    """
    if logits.dtype == torch.float32 or not logits.requires_grad:
        return _ce_fp32(logits, target)
    return torch.cat([checkpoint(_ce_fp32, x, t, use_reentrant=False)
                      for x, t in zip(logits.split(CE_CHUNK_ROWS), target.split(CE_CHUNK_ROWS))])

def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_hidden(dim: int) -> int:
    # LlamaGen's rule for every size; tiny dims simply round up to 256 (4x at dim 64).
    return find_multiple(int(8 * dim / 3), 256)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 sums of squares lose precision), return in x's dtype.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# ----------------------------------------------------------------------------- RoPE

def grid_rope(coords: torch.Tensor, head_dim: int, base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (S, head_dim/2) for sequence coordinates `coords` (S, 2) = (row, col).

    The condition token is given coordinate (0, 0), i.e. angle 0 (identity rotation).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim} (dim / n_head)")
    quarter = head_dim // 4
    freqs = 1.0 / (base ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))  # (quarter,)
    assert freqs.numel() == quarter
    coords = coords.float()
    angles = torch.cat([coords[:, :1] * freqs, coords[:, 1:] * freqs], dim=-1)  # (S, head_dim/2): rows, then cols
    return angles.cos(), angles.sin()


def raster_coords(grid: int) -> torch.Tensor:
    """(row, col) of the grid*grid positions in row-major order: (grid*grid, 2)."""
    idx = torch.arange(grid * grid)
    return torch.stack([idx // grid, idx % grid], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs. x (B, T, H, hd); cos, sin (T, hd/2)."""
    B, T, H, hd = x.shape
    xf = x.float().view(B, T, H, hd // 2, 2)
    x0, x1 = xf.unbind(-1)  # (B, T, H, hd/2)
    cos, sin = cos.view(1, T, 1, hd // 2), sin.view(1, T, 1, hd // 2)
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(3).type_as(x)


def rope_at(cos: torch.Tensor, sin: torch.Tensor, pos: int | StaticPos) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, hd/2) rows of the RoPE tables for one decode step at sequence index `pos`."""
    if isinstance(pos, StaticPos):
        idx = pos.index.reshape(1)
        return cos.index_select(0, idx), sin.index_select(0, idx)
    return cos[pos:pos + 1], sin[pos:pos + 1]


# ----------------------------------------------------------------------------- attention + cache

class KVCache(nn.Module):
    """Preallocated keys and values (B, H, max_len, hd) of one attention layer."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int | StaticPos):
        """Store k, v (B, H, T, hd) at `pos`; return (keys, values, attn_mask) to attend over.

        int pos: keys/values of the prefix [:pos + T] and a causal mask only when T > 1.
        StaticPos (T must be 1): the first `span` slots and a (1, 1, 1, span) length mask.
        """
        T = k.shape[2]
        if isinstance(pos, StaticPos):
            if T != 1:
                raise ValueError("static-shape decoding feeds one sequence index per step")
            n = pos.span
            if n > self.k.shape[2]:
                raise ValueError(f"KV cache holds {self.k.shape[2]} positions, step attends over {n}")
            idx = pos.index.reshape(1)
            self.k.index_copy_(2, idx, k)
            self.v.index_copy_(2, idx, v)
            return self.k[:, :, :n], self.v[:, :, :n], (self.slots[:n] <= pos.index).view(1, 1, 1, n)
        end = pos + T
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, step writes up to {end}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        mask = None
        if T > 1:
            mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(pos)  # (T, end)
        return self.k[:, :, :end], self.v[:, :, :end], mask


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, dropout: float):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim {dim} is not divisible by n_head {n_head}")
        self.n_head, self.head_dim = n_head, dim // n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                pos: int | torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # each (B, T, H, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if self.cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v, mask = self.cache.update(k, v, pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.drop(self.proj(y))


class FeedForward(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.drop(self.w2(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, dropout: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, n_head, dropout)
        self.ffn_norm = RMSNorm(dim)
        self.ffn = FeedForward(dim, ffn_hidden(dim), dropout)

    def forward(self, x, rope, pos=None):
        x = x + self.attn(self.attn_norm(x), rope, pos)
        return x + self.ffn(self.ffn_norm(x))


class LayerStack(nn.Module):
    """A list of blocks with cache management. Generators may run blocks one by one (`run`)."""

    def __init__(self, *, n_layer: int, dim: int, n_head: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, n_head, dropout) for _ in range(n_layer))
        self.n_head, self.head_dim = n_head, dim // n_head
        # Activation checkpointing (recompute blocks in backward): for XXL and larger.
        self.activation_checkpointing = False
        self._kept_caches: list[KVCache] | None = None  # a plain list: not submodules, not in state_dict

    def __len__(self) -> int:
        return len(self.blocks)

    def run(self, i: int, x: torch.Tensor, rope, pos=None) -> torch.Tensor:
        block = self.blocks[i]
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, rope, pos, use_reentrant=False)
        return block(x, rope, pos)

    def forward(self, x: torch.Tensor, rope, pos=None) -> torch.Tensor:
        for i in range(len(self.blocks)):
            x = self.run(i, x, rope, pos)
        return x

    def setup_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> None:
        """Attach a KV cache to every attention layer, reusing the kept ones when the shape matches."""
        kept, self._kept_caches = self._kept_caches, None
        want = (batch, self.n_head, max_len, self.head_dim)
        if kept is None or kept[0].k.shape != want or kept[0].k.dtype != dtype or kept[0].k.device != device:
            kept = [KVCache(batch, self.n_head, max_len, self.head_dim, dtype=dtype, device=device)
                    for _ in self.blocks]
        for block, cache in zip(self.blocks, kept):
            block.attn.cache = cache

    def clear_cache(self, keep: bool = False) -> None:
        """Detach the caches (the model is then back to full-sequence causal attention).

        keep=True holds on to them for the next `setup_cache` of the same shape: captured
        CUDA graphs refer to buffer addresses, so reusing them avoids re-recording every call.
        """
        self._kept_caches = [block.attn.cache for block in self.blocks] if keep else None
        for block in self.blocks:
            block.attn.cache = None


# ----------------------------------------------------------------------------- conditioning + heads

class ConditionEmbedding(nn.Module):
    """The first sequence token: a class embedding (with a null row for CFG) or one learned start token.

    num_classes > 0: rows 0..num_classes-1 are classes, row num_classes the null label;
    in training each label becomes null with probability `class_dropout`.
    num_classes == 0: a single row, used for every sample (unconditional, e.g. text data).
    """

    def __init__(self, num_classes: int, dim: int, class_dropout: float):
        super().__init__()
        self.num_classes, self.class_dropout = num_classes, class_dropout
        self.table = nn.Embedding(num_classes + 1 if num_classes > 0 else 1, dim)

    def labels(self, cond: torch.Tensor | None, batch_size: int | None, device) -> torch.Tensor:
        """Validated row indices (B,) for `cond` (no dropout)."""
        if self.num_classes == 0:
            if cond is not None:
                raise ValueError("this generator is unconditional (num_classes=0): pass cond=None")
            if batch_size is None:
                raise ValueError("unconditional generator: batch_size is required when cond is None")
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if cond is None:
            raise ValueError(f"this generator is class-conditional ({self.num_classes} classes): "
                             "cond (B,) int64 labels are required")
        if cond.dim() != 1 or cond.dtype.is_floating_point:
            raise ValueError(f"cond: expected integer labels of shape (B,), got {tuple(cond.shape)} {cond.dtype}")
        if batch_size is not None and batch_size != cond.shape[0]:
            raise ValueError(f"batch_size {batch_size} does not match cond with {cond.shape[0]} labels")
        if not torch.compiler.is_compiling() and cond.numel():
            lo, hi = int(cond.min()), int(cond.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(f"cond: labels must lie in [0, {self.num_classes}] "
                                 f"({self.num_classes} = null label), got range [{lo}, {hi}]")
        return cond.to(device=device, dtype=torch.long)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, dim) of rows from `labels`; label dropout in training."""
        if self.training and self.num_classes > 0 and self.class_dropout > 0:
            drop = torch.rand(rows.shape, device=rows.device) < self.class_dropout
            rows = torch.where(drop, torch.full_like(rows, self.num_classes), rows)
        return self.table(rows)


class Head(nn.Module):
    """RMSNorm + zero-initialised bias-free Linear(dim, vocab) (dnd-spec section 3)."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(h))


def init_weights(model: nn.Module) -> None:
    """N(0, 0.02) for every Linear and Embedding, then zero for the prediction heads' linears."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
    for m in model.modules():
        if isinstance(m, Head):
            nn.init.zeros_(m.out.weight)


# ----------------------------------------------------------------------------- the common generator interface

class CodeGenerator(nn.Module):
    """What the three generator kinds share: conditioning, input checks, loss, decoding.

    forward(codes, cond) -> (logits, loss): codes int (B, grid*grid, depth), cond (B,) labels
    or None; logits (B, grid*grid, depth, codebook_size); loss = mean cross-entropy over
    all positions and depths. The per-depth losses of the last forward are kept, detached,
    in `last_depth_losses` (D,) (also returned by `loss_terms`).

    generate(...) decodes with the KV cache (see `dnd.generators.sampling.decode`).

    Subclasses define `num_steps` / `codes_per_step` (decode steps and codes produced per
    step), `_setup_caches(batch, dtype=, device=)`, `_clear_caches(keep)`, `_decode_step`
    and `_step_input`.
    `model_args` (plain, JSON-able) is what `dnd.generators.build` needs to rebuild the model.
    """

    num_steps: int
    codes_per_step: int

    def __init__(self, *, depth: int, codebook_size: int, grid: int, num_classes: int, dim: int,
                 token_dropout: float, class_dropout: float):
        super().__init__()
        if depth < 1 or codebook_size < 2 or grid < 1 or num_classes < 0:
            raise ValueError(f"invalid generator shape: depth={depth} (>= 1), codebook_size={codebook_size} "
                             f"(>= 2), grid={grid} (>= 1), num_classes={num_classes} (>= 0)")
        self.depth, self.codebook_size, self.grid, self.num_classes = depth, codebook_size, grid, num_classes
        self.seq_len = grid * grid
        self.dim = dim
        self.cond_emb = ConditionEmbedding(num_classes, dim, class_dropout)
        self.token_drop = nn.Dropout(token_dropout)
        self.model_args: dict = {}
        self.last_depth_losses: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        want = (self.seq_len, self.depth)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != want or codes.dtype.is_floating_point:
            raise ValueError(f"codes: expected integer codes of shape (B, {want[0]}, {want[1]}) (grid "
                             f"{self.grid}x{self.grid}, depth {self.depth}), got {tuple(codes.shape)} {codes.dtype}")
        if not torch.compiler.is_compiling() and codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"codes: values must lie in [0, {self.codebook_size}), got range [{lo}, {hi}]")
        return codes.long()

    def condition(self, cond: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Condition-token embeddings (B, dim), label dropout in training."""
        return self.cond_emb(self.cond_emb.labels(cond, batch_size, self.device))

    def loss_terms(self, logits: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, per-depth losses (D,)) of logits (B, L, D, V) against codes (B, L, D)."""
        ce = cross_entropy_rows(logits.flatten(0, 2), codes.flatten())  # (B*L*D,)
        per_depth = ce.view(-1, self.depth).mean(0)  # (D,)
        return per_depth.mean(), per_depth

    def _finish(self, logits: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, per_depth = self.loss_terms(logits, codes)
        self.last_depth_losses = per_depth.detach()
        return logits, loss

    def pick(self, logits: torch.Tensor, depth: int | torch.Tensor, noise: torch.Tensor | None,
             policy, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose codes from decode logits (B', V): returns (codes (B,), codes to feed back (B',)).

        With guidance the batch is [cond; null]: one guided choice is shared by both halves.
        """
        if guided:
            code = policy.pick(policy.guide(logits), depth, noise)  # (B,)
            return code, torch.cat([code, code])
        code = policy.pick(logits, depth, noise)
        return code, code

    def generate(self, cond: torch.Tensor | None = None, *, batch_size: int | None = None, sampler=None,
                 generator: torch.Generator | None = None, compile: bool = False,
                 static: bool | None = None) -> torch.Tensor:
        """Sample codes (B, grid*grid, depth) int64 with the KV cache; see `sampling.decode`."""
        return decode(self, cond, batch_size=batch_size, sampler=sampler, generator=generator, compile=compile,
                      static=static)
