"""Residual vector quantization with EMA codebooks and dead-code restarts (dnd-spec section 1).

A vector z is quantized greedily over D depths: starting from the residual r = z, depth d
picks the nearest entry k_d of its codebook, subtracts it from r, and adds it to the
running sum. The quantized vector is the sum over depths of the chosen entries, so any
prefix of the codes (the first d depths) decodes to a coarser partial sum.

Codebook updates (a deliberate choice, see dnd-spec section 7)
-------------------------------------------------------------
Codebooks are buffers updated by exponential moving averages, never by gradients.
The reference (RQ-VAE / DnD) runs the EMA update and the dead-code restart once per
depth per step, so with a shared codebook a step applies D sequential updates, and the
later depths of that step look up codes in a codebook the earlier depths already moved.

This implementation applies **one aggregated update per step**: all D nearest-code
searches of a step use the same codebook (the one the forward pass returns vectors
from); then, per codebook, the assignment counts and vector sums are summed over every
depth that uses it (all D depths when shared, one depth each when unshared) and over
all ranks, the EMA moves once with `ema_decay`, and dead codes (EMA count below 1) are
restarted once. Why: the decay then means the same thing for every depth count (with D
sequential updates a shared codebook forgets D times faster), the step is independent
of the depth order, and it costs one all-reduce per codebook instead of D. Restart
vectors are drawn from the residuals of every depth of the batch (deep residuals are
what deep depths must code), tiled with small noise when the batch holds fewer vectors
than the codebook, and broadcast from rank 0 so that every rank holds the same codebook.

The codebook starts as N(0, 1) noise with zero EMA counts, so with restarts enabled the
first training step replaces every entry by a vector of the batch (data init).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ResidualQuantizer(nn.Module):
    """D-depth residual quantizer over one shared (or D separate) EMA codebook(s) of N entries.

    `forward(z) -> (z_q, codes, commitment)` for z of shape (..., dim): `z_q` carries the
    straight-through gradient to z, `codes` are int64 (..., depth), `commitment` is the
    mean over depths of mean((z - partial_sum_d)^2) (unweighted; multiply by
    `self.commitment`). In training mode the forward also updates the codebooks once.
    """

    def __init__(self, *, dim: int, codebook_size: int, depth: int, shared_codebook: bool = True,
                 ema_decay: float = 0.99, restart_unused: bool = True, commitment: float = 0.25,
                 eps: float = 1e-5):
        super().__init__()
        if depth < 1 or codebook_size < 2 or dim < 1:
            raise ValueError(f"ResidualQuantizer: need depth >= 1, codebook_size >= 2, dim >= 1; "
                             f"got depth={depth}, codebook_size={codebook_size}, dim={dim}")
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.shared_codebook, self.ema_decay = shared_codebook, ema_decay
        self.restart_unused, self.commitment, self.eps = restart_unused, commitment, eps
        books = 1 if shared_codebook else depth
        self.register_buffer("embed", torch.randn(books, codebook_size, dim))  # (books, N, dim)
        self.register_buffer("cluster_size_ema", torch.zeros(books, codebook_size))  # (books, N)
        self.register_buffer("embed_ema", self.embed.clone())  # (books, N, dim)

    def book_index(self, d: int) -> int:
        if not 0 <= d < self.depth:
            raise IndexError(f"depth {d} out of range for a {self.depth}-depth quantizer")
        return 0 if self.shared_codebook else d

    def codebook(self, d: int) -> torch.Tensor:
        """(N, dim) codebook used at depth d; the very same tensor for every d when shared."""
        return self.embed[self.book_index(d)]

    @torch.no_grad()
    def nearest(self, r: torch.Tensor, d: int) -> torch.Tensor:
        """Index of the nearest codebook-d entry for each row of r (M, dim) -> (M,) int64."""
        book = self.codebook(d)  # (N, dim)
        dist2 = r.pow(2).sum(1, keepdim=True) - 2 * r @ book.t() + book.pow(2).sum(1)  # (M, N)
        return dist2.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if z.shape[-1] != self.dim:
            raise ValueError(f"ResidualQuantizer: last dimension of z is {z.shape[-1]}, expected {self.dim}")
        lead = z.shape[:-1]
        # Distances, sums and EMA statistics in fp32 even under bf16 autocast.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.detach().float().reshape(-1, self.dim)  # (M, dim)
            residual = flat.clone()
            partial = torch.zeros_like(flat)
            codes, residuals, commitment = [], [], flat.new_zeros(())
            zf = z.float()
            for d in range(self.depth):
                residuals.append(residual.clone())
                idx = self.nearest(residual, d)  # (M,)
                chosen = self.codebook(d)[idx]  # (M, dim)
                residual -= chosen
                partial = partial + chosen
                codes.append(idx)
                commitment = commitment + (zf.reshape(-1, self.dim) - partial).pow(2).mean()
            commitment = commitment / self.depth
            codes_t = torch.stack(codes, dim=-1)  # (M, D)
            if self.training:
                self._update_codebooks(residuals, codes_t)
        zf = zf.reshape(*lead, self.dim)
        z_q = zf + (partial.reshape(*lead, self.dim) - zf).detach()  # straight-through estimator, fp32
        return z_q, codes_t.reshape(*lead, self.depth), commitment

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., dim) -> (z_q (..., dim), codes int64 (..., depth)); see the class docstring."""
        z_q, codes, _ = self(z)
        return z_q, codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 (..., d) with d <= depth -> sum over the first d depths (..., dim)."""
        d = codes.shape[-1]
        if not 1 <= d <= self.depth:
            raise ValueError(f"codes have {d} depths; this quantizer decodes 1 to {self.depth}")
        return sum(self.codebook(i)[codes[..., i]] for i in range(d))

    @torch.no_grad()
    def _update_codebooks(self, residuals: list[torch.Tensor], codes: torch.Tensor) -> None:
        """One EMA update and one restart per codebook, statistics summed over its depths."""
        for book in range(self.embed.shape[0]):
            depths = range(self.depth) if self.shared_codebook else [book]
            vectors = torch.cat([residuals[d] for d in depths])  # (M * |depths|, dim)
            idx = torch.cat([codes[:, d] for d in depths])  # (M * |depths|,)
            counts = torch.bincount(idx, minlength=self.codebook_size).float()  # (N,)
            sums = torch.zeros_like(self.embed_ema[book]).index_add_(0, idx, vectors)  # (N, dim)
            if _distributed():
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            self.cluster_size_ema[book].mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.embed_ema[book].mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            if self.restart_unused:
                self._restart_dead(book, vectors)
            size = self.cluster_size_ema[book]
            n = size.sum()
            # Laplace smoothing keeps never-used codes finite when restarts are off.
            smoothed = (size + self.eps) / (n + self.codebook_size * self.eps) * n
            self.embed[book].copy_(self.embed_ema[book] / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead(self, book: int, vectors: torch.Tensor) -> None:
        n = self.codebook_size
        if vectors.shape[0] < n:
            repeats = -(-n // vectors.shape[0])
            noise = torch.rand(repeats * vectors.shape[0], self.dim, device=vectors.device)
            vectors = vectors.repeat(repeats, 1) + noise * (0.01 / self.dim ** 0.5)
        fresh = vectors[torch.randperm(vectors.shape[0], device=vectors.device)[:n]].contiguous()  # (N, dim)
        if _distributed():
            dist.broadcast(fresh, src=0)
        dead = self.cluster_size_ema[book] < 1.0  # (N,)
        self.embed_ema[book][dead] = fresh[dead]
        self.cluster_size_ema[book][dead] = 1.0

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, depth={self.depth}, "
                f"shared_codebook={self.shared_codebook}, ema_decay={self.ema_decay}, "
                f"restart_unused={self.restart_unused}")
