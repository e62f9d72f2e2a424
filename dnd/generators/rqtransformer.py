"""RQ-Transformer (dnd-spec section 4) on the shared LLaMA backbone.

Spatial transformer (n_layer - depth_layers blocks, 2-D RoPE) over positions: the input
at index t is the condition token (t = 0) or the sum of the D code embeddings of
position t - 1, exactly as DnD's input. Its output at index t, RMS-normalised, is the
context of position t. A depth transformer (depth_layers blocks, causal over depth, no
RoPE) then runs per position over D slots: slot 0 = the context, slot d > 0 = the
cumulative sum of the embeddings of the codes of depths 0..d-1 of that position; a
learned depth position embedding is added to every slot. A classifier shared by all
depths (RMSNorm + Linear, zero-init) reads every slot; slot d predicts the depth-d code.
One code-embedding table serves both transformers (like DnD's single table), so the
three generators differ only in how depth is modelled.

Soft targets (soft_targets = T > 0): the target of a code c is softmax(-||e_c - e_k||^2 / T)
over the tokenizer's codebook entries e_k (the RQ-Transformer recipe uses the distance of
the continuous residual; only codes are stored here, so the chosen code vector e_c stands
in for it). The codebook (N, C) is passed to `build(..., codebook=...)` or `set_codebook`;
it is not saved in the checkpoint (a loaded model samples without it). Stochastic
(sampled) RQ codes are not implemented: they need the tokenizer's latents at training time.

Decoding: per position one cached spatial step, then D cached depth steps; guidance is
applied to every depth's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dnd.generators.backbone import (CodeGenerator, Head, LayerStack, RMSNorm, grid_rope, init_weights,
                                     raster_coords, rope_at)
from dnd.generators.sampling import StaticPos


class RQTransformer(CodeGenerator):
    def __init__(self, *, depth: int, codebook_size: int, grid: int, num_classes: int = 0, n_layer: int,
                 n_head: int, dim: int, dropout: float = 0.1, token_dropout: float = 0.1,
                 class_dropout: float = 0.1, depth_layers: int = 1, soft_targets: float = 0.0,
                 codebook: torch.Tensor | None = None):
        super().__init__(depth=depth, codebook_size=codebook_size, grid=grid, num_classes=num_classes, dim=dim,
                         token_dropout=token_dropout, class_dropout=class_dropout)
        if not 1 <= depth_layers < n_layer:
            raise ValueError(f"depth_layers: {depth_layers} depth-transformer layers out of {n_layer} leave "
                             f"no spatial layer (need 1 <= depth_layers < n_layer)")
        if soft_targets < 0:
            raise ValueError(f"soft_targets: temperature {soft_targets} is negative (0 = hard targets)")
        self.soft_targets = float(soft_targets)
        self.tok_emb = nn.Embedding(codebook_size, dim)
        self.spatial = LayerStack(n_layer=n_layer - depth_layers, dim=dim, n_head=n_head, dropout=dropout)
        self.context_norm = RMSNorm(dim)  # the spatial stream has no final norm of its own
        self.depth_pos = nn.Embedding(depth, dim)
        self.depth_stack = LayerStack(n_layer=depth_layers, dim=dim, n_head=n_head, dropout=dropout)
        self.head = Head(dim, codebook_size)
        coords = torch.cat([torch.zeros(1, 2, dtype=torch.long), raster_coords(grid)[:-1]])  # (L, 2)
        cos, sin = grid_rope(coords, dim // n_head)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.codebook: torch.Tensor | None
        self.register_buffer("codebook", None, persistent=False)
        if codebook is not None:
            self.set_codebook(codebook)
        init_weights(self)

    def set_codebook(self, codebook: torch.Tensor) -> None:
        """The tokenizer's codebook (N, C) for soft targets (not saved with the model)."""
        if codebook.dim() != 2 or codebook.shape[0] != self.codebook_size:
            raise ValueError(f"codebook: expected shape ({self.codebook_size}, C), got {tuple(codebook.shape)}")
        self.codebook = codebook.detach().float().to(self.tok_emb.weight.device)

    @property
    def num_steps(self) -> int:  # one spatial step (and D depth steps) per position
        return self.seq_len

    @property
    def codes_per_step(self) -> int:
        return self.depth

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None):
        """Teacher-forced logits (B, L, D, V) and mean CE; per-depth CE in `last_depth_losses`."""
        codes = self.check_codes(codes)  # (B, L, D)
        B, L, D = codes.shape
        emb = self.tok_emb(codes)  # (B, L, D, dim)
        x = torch.cat([self.condition(cond, B)[:, None], emb[:, :-1].sum(2)], dim=1)  # (B, L, dim)
        context = self.context_norm(self.spatial(self.token_drop(x), (self.rope_cos, self.rope_sin)))  # (B, L, dim)
        slots = torch.cat([context[:, :, None], emb[:, :, :-1].cumsum(2)], dim=2)  # (B, L, D, dim)
        slots = slots + self.depth_pos.weight  # (B, L, D, dim)
        h = self.depth_stack(slots.view(B * L, D, self.dim), None)  # (B*L, D, dim)
        logits = self.head(h).view(B, L, D, self.codebook_size)
        return self._finish(logits, codes)

    def loss_terms(self, logits: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.soft_targets == 0:
            return super().loss_terms(logits, codes)
        if self.codebook is None:
            raise ValueError(f"soft_targets={self.soft_targets} needs the tokenizer's codebook: pass "
                             "build(..., codebook=tensor (N, C)) or call model.set_codebook(codebook)")
        e = self.codebook  # (N, C)
        chosen = e[codes.flatten()]  # (M, C)
        dist = chosen.pow(2).sum(-1, keepdim=True) - 2 * chosen @ e.T + e.pow(2).sum(-1)  # (M, N)
        target = (-dist / self.soft_targets).softmax(-1)
        ce = F.cross_entropy(logits.float().flatten(0, 2), target, reduction="none")  # (M,)
        per_depth = ce.view(-1, self.depth).mean(0)  # (D,)
        return per_depth.mean(), per_depth

    # ------------------------------------------------------------------ decoding

    def _setup_caches(self, batch: int, *, dtype, device) -> None:
        self.spatial.setup_cache(batch, self.seq_len, dtype=dtype, device=device)
        self.depth_stack.setup_cache(batch, self.depth, dtype=dtype, device=device)

    def _clear_caches(self, keep: bool = False) -> None:
        self.spatial.clear_cache(keep)
        self.depth_stack.clear_cache(keep)

    def _decode_step(self, x, pos, noise, policy, guided):
        """One position: x (B', 1, dim) -> its D codes (B, D) and the same fed back (B', D).

        The depth cache is simply overwritten from slot 0 at every position.
        """
        context = self.context_norm(self.spatial(x, rope_at(self.rope_cos, self.rope_sin, pos), pos))  # (B', 1, dim)
        slot, cumulative = context, None
        chosen, fed = [], []
        for d in range(self.depth):
            # The depth cache holds D slots; the static path attends over the d + 1 filled ones.
            depth_pos = StaticPos(torch.full_like(pos.index, d), d + 1) if isinstance(pos, StaticPos) else d
            h = self.depth_stack(slot + self.depth_pos.weight[d], None, depth_pos)  # (B', 1, dim)
            code, back = self.pick(self.head(h)[:, -1], d, None if noise is None else noise[:, d], policy, guided)
            chosen.append(code)
            fed.append(back)
            e = self.tok_emb(back)[:, None]  # (B', 1, dim)
            cumulative = e if cumulative is None else cumulative + e
            slot = cumulative
        return torch.stack(chosen, 1), torch.stack(fed, 1)

    def _step_input(self, fed: torch.Tensor, step: int) -> torch.Tensor:
        return self.tok_emb(fed).sum(1, keepdim=True)  # (B', 1, dim)
