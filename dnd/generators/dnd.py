"""DnD-Transformer: all D residual codes of a position from one forward pass (dnd-spec section 3).

The input at a sequence index is the condition token (index 0) or the sum of the D code
embeddings of the previous position (one table shared by all depths, no depth
embedding); the output at index t predicts position t. Depth head k (RMSNorm + zero-init
Linear) reads the hidden state after layer `head_layers[k]`; after head k (except the
last) the embedding of the depth-k code of position t is added to the residual stream:
the ground-truth code in training (teacher forcing), the sampled one at inference. So
head k at position t sees the codes of depths < k of that position and nothing of
depths >= k.

Heads placed at the same layer run in order, each after the previous head's code was
added. heads="parallel" (the paper's ablation): every head reads the final hidden state
and no code embedding is added, i.e. the D codes of a position are predicted
independently of each other.
"""
from __future__ import annotations

import torch
from torch import nn

from dnd.generators.backbone import (CodeGenerator, Head, LayerStack, grid_rope, init_weights, raster_coords,
                                     rope_at)


def default_head_layers(n_layer: int, depth: int) -> list[int]:
    """The head placement used when the config names none.

    The last head sits after the last layer; the others are spaced `step` layers apart
    below it, with step = min(n_layer // 6, (n_layer // 2 - 1) // (depth - 1)), i.e. at
    most a sixth of the model between heads and all heads within the top half. Head k
    reads after layer n_layer - 1 - (depth - 1 - k) * step. For 48 layers this gives the
    published placements: depth 2 -> [39, 47], depth 8 -> [26, 29, ..., 44, 47];
    depth 1 -> [n_layer - 1]. Models under 6 layers get step 0 (every head after the
    last layer, still conditioned on the lower depths' codes).
    """
    if depth < 1 or n_layer < 1:
        raise ValueError(f"head placement needs n_layer >= 1 and depth >= 1, got {n_layer}, {depth}")
    if depth == 1:
        return [n_layer - 1]
    step = min(n_layer // 6, (n_layer // 2 - 1) // (depth - 1))
    return [n_layer - 1 - (depth - 1 - k) * step for k in range(depth)]


def resolve_head_layers(head_layers: list[int] | None, heads: str, *, n_layer: int, depth: int) -> list[int]:
    if heads not in ("spread", "parallel"):
        raise ValueError(f"heads: expected 'spread' or 'parallel', got {heads!r}")
    if heads == "parallel":
        if head_layers is not None:
            raise ValueError("head_layers: parallel heads all read the last layer; leave head_layers unset")
        return [n_layer - 1] * depth
    if head_layers is None:
        return default_head_layers(n_layer, depth)
    layers = [int(i) for i in head_layers]
    if len(layers) != depth:
        raise ValueError(f"head_layers: {len(layers)} heads given but the code depth is {depth} "
                         f"(one head per depth)")
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"head_layers: layer index {bad[0]} is outside the model's {n_layer} layers "
                         f"(0-based, 0..{n_layer - 1})")
    if layers != sorted(layers) or layers[-1] != n_layer - 1:
        raise ValueError(f"head_layers: {layers} must be non-decreasing and end at the last layer ({n_layer - 1})")
    return layers


class DnDTransformer(CodeGenerator):
    """DnD-Transformer; with depth 1 it is the 1-D AR (LlamaGen GPT) over single codes."""

    def __init__(self, *, depth: int, codebook_size: int, grid: int, num_classes: int = 0, n_layer: int,
                 n_head: int, dim: int, dropout: float = 0.1, token_dropout: float = 0.1,
                 class_dropout: float = 0.1, head_layers: list[int] | None = None, heads: str = "spread"):
        super().__init__(depth=depth, codebook_size=codebook_size, grid=grid, num_classes=num_classes, dim=dim,
                         token_dropout=token_dropout, class_dropout=class_dropout)
        self.head_layers = resolve_head_layers(head_layers, heads, n_layer=n_layer, depth=depth)
        self.spread = heads == "spread"
        self.tok_emb = nn.Embedding(codebook_size, dim)
        self.layers = LayerStack(n_layer=n_layer, dim=dim, n_head=n_head, dropout=dropout)
        self.heads = nn.ModuleList(Head(dim, codebook_size) for _ in range(depth))
        # Sequence index 0 = condition (coordinate (0, 0): identity rotation), t >= 1 = position t - 1.
        coords = torch.cat([torch.zeros(1, 2, dtype=torch.long), raster_coords(grid)[:-1]])  # (L, 2)
        cos, sin = grid_rope(coords, dim // n_head)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self)

    @property
    def num_steps(self) -> int:  # one decode step per position
        return self.seq_len

    @property
    def codes_per_step(self) -> int:
        return self.depth

    def _trunk(self, h: torch.Tensor, rope, pos, head_code) -> list[torch.Tensor]:
        """Run the layers and heads. head_code(k, logits) -> depth-k codes (B, T) to add after head k."""
        logits, k = [], 0
        for i in range(len(self.layers)):
            h = self.layers.run(i, h, rope, pos)
            while k < self.depth and self.head_layers[k] == i:
                out = self.heads[k](h)  # (B, T, V)
                logits.append(out)
                code = head_code(k, out)
                if self.spread and k < self.depth - 1:
                    h = h + self.tok_emb(code)  # (B, T, dim)
                k += 1
        return logits

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None):
        """Teacher-forced logits (B, L, D, V) and mean CE; per-depth CE in `last_depth_losses`."""
        codes = self.check_codes(codes)  # (B, L, D)
        B = codes.shape[0]
        x = torch.cat([self.condition(cond, B)[:, None], self.tok_emb(codes[:, :-1]).sum(2)], dim=1)  # (B, L, dim)
        logits = self._trunk(self.token_drop(x), (self.rope_cos, self.rope_sin), None,
                             lambda k, _: codes[:, :, k])
        return self._finish(torch.stack(logits, dim=2), codes)  # (B, L, D, V)

    # ------------------------------------------------------------------ decoding

    def _setup_caches(self, batch: int, *, dtype, device) -> None:
        self.layers.setup_cache(batch, self.seq_len, dtype=dtype, device=device)

    def _clear_caches(self, keep: bool = False) -> None:
        self.layers.clear_cache(keep)

    def _decode_step(self, x, pos, noise, policy, guided):
        """One position: x (B', 1, dim) -> its D codes (B, D) and the same fed back (B', D)."""
        chosen, fed = [], []

        def head_code(k, logits):
            code, back = self.pick(logits[:, -1], k, None if noise is None else noise[:, k], policy, guided)
            chosen.append(code)
            fed.append(back)
            return back[:, None]  # (B', 1)

        self._trunk(x, rope_at(self.rope_cos, self.rope_sin, pos), pos, head_code)
        return torch.stack(chosen, 1), torch.stack(fed, 1)

    def _step_input(self, fed: torch.Tensor, step: int) -> torch.Tensor:
        return self.tok_emb(fed).sum(1, keepdim=True)  # (B', 1, dim)
