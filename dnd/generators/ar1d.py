"""1-D raster autoregression (dnd-spec section 5), in the two variants the paper leaves ambiguous.

* flatten=False: one code per position, for a depth-1 tokenizer. This is exactly the
  DnD-Transformer with a single head after the last layer (LlamaGen's GPT plus the
  head's norm), so `build` returns a `DnDTransformer` for it instead of a copy.
* flatten=True (`FlattenedAR`): the D codes of every position become D consecutive steps,
  a sequence of grid*grid*D codes, one code per forward step. Position encoding: the
  2-D RoPE of the code's (row, col), shared by the D codes of a position, plus a learned
  depth embedding added to the code's input embedding. As everywhere, the input at
  sequence index s + 1 is code s (index 0 = condition) and the output at index s
  predicts code s.
"""
from __future__ import annotations

import torch
from torch import nn

from dnd.generators.backbone import (CodeGenerator, Head, LayerStack, grid_rope, init_weights, raster_coords,
                                     rope_at)
from dnd.generators.sampling import position_index


class FlattenedAR(CodeGenerator):
    def __init__(self, *, depth: int, codebook_size: int, grid: int, num_classes: int = 0, n_layer: int,
                 n_head: int, dim: int, dropout: float = 0.1, token_dropout: float = 0.1,
                 class_dropout: float = 0.1):
        super().__init__(depth=depth, codebook_size=codebook_size, grid=grid, num_classes=num_classes, dim=dim,
                         token_dropout=token_dropout, class_dropout=class_dropout)
        self.tok_emb = nn.Embedding(codebook_size, dim)
        self.depth_emb = nn.Embedding(depth, dim)
        self.layers = LayerStack(n_layer=n_layer, dim=dim, n_head=n_head, dropout=dropout)
        self.head = Head(dim, codebook_size)
        steps = self.seq_len * depth
        # Index 0 = condition (identity rotation); index s + 1 holds code s of position s // depth.
        code_coords = raster_coords(grid).repeat_interleave(depth, dim=0)  # (L*D, 2)
        coords = torch.cat([torch.zeros(1, 2, dtype=torch.long), code_coords[:-1]])  # (L*D, 2)
        cos, sin = grid_rope(coords, dim // n_head)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L*D, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("input_depth", torch.arange(steps - 1) % depth, persistent=False)  # (L*D - 1,)
        init_weights(self)

    @property
    def num_steps(self) -> int:  # one decode step per code
        return self.seq_len * self.depth

    @property
    def codes_per_step(self) -> int:
        return 1

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None):
        """Teacher-forced logits (B, L, D, V) and mean CE; per-depth CE in `last_depth_losses`."""
        codes = self.check_codes(codes)  # (B, L, D)
        B = codes.shape[0]
        flat = codes.flatten(1)  # (B, L*D)
        x = self.tok_emb(flat[:, :-1]) + self.depth_emb(self.input_depth)  # (B, L*D - 1, dim)
        x = torch.cat([self.condition(cond, B)[:, None], x], dim=1)  # (B, L*D, dim)
        h = self.layers(self.token_drop(x), (self.rope_cos, self.rope_sin))
        logits = self.head(h).view(B, self.seq_len, self.depth, self.codebook_size)  # (B, L, D, V)
        return self._finish(logits, codes)

    # ------------------------------------------------------------------ decoding

    def _setup_caches(self, batch: int, *, dtype, device) -> None:
        self.layers.setup_cache(batch, self.num_steps, dtype=dtype, device=device)

    def _clear_caches(self, keep: bool = False) -> None:
        self.layers.clear_cache(keep)

    def _decode_step(self, x, pos, noise, policy, guided):
        """One code: x (B', 1, dim) -> code (B, 1) and the same fed back (B', 1)."""
        h = self.layers(x, rope_at(self.rope_cos, self.rope_sin, pos), pos)
        code, fed = self.pick(self.head(h)[:, -1], position_index(pos) % self.depth,
                              None if noise is None else noise[:, 0], policy, guided)
        return code[:, None], fed[:, None]

    def _step_input(self, fed: torch.Tensor, step: int) -> torch.Tensor:
        return self.tok_emb(fed) + self.depth_emb.weight[step % self.depth]  # (B', 1, dim)
