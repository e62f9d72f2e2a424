"""RQ-VAE: a taming-style convolutional encoder/decoder around a `ResidualQuantizer` (dnd-spec section 1).

Encoder: conv_in, then per `ch_mult` level `num_res_blocks` residual blocks (each followed
by single-head self-attention when the level's resolution is in `attn_resolutions`) and a
stride-2 conv on every level but the last; a middle (res, attn, res); GroupNorm, SiLU and a
3x3 conv to `z_channels`. The decoder mirrors it with `num_res_blocks + 1` blocks per level
and nearest x2 upsampling, with no output activation. 1x1 `quant_conv` / `post_quant_conv`
map between `z_channels` and the code dimension `embed_dim`. Latents are quantized
channels-last, (B, h, w, embed_dim).

`stem_stride` 2 makes the stem cheap: the encoder's conv_in is a 4x4 stride-2 conv and the
decoder's conv_out a 4x4 stride-2 transposed conv, so no block runs at full resolution and
the downsampling factor is 2 ** (len(ch_mult) - 1) * stem_stride.

Cost note: every full-resolution block runs on H x W pixels, so on a CPU keep `ch` (the
width of the first level) small and put the wide levels at low resolution, or use
`stem_stride` 2.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dnd.checkpoint import load_checkpoint
from dnd.tokenizer.quantizer import ResidualQuantizer


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in taming, fewer when the (cheap, narrow) layer has fewer channels.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # each (B, hw, C)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _stage(c_in: int, c_out: int, blocks: int, attn: bool) -> tuple[nn.ModuleList, int]:
    layers = nn.ModuleList()
    for _ in range(blocks):
        layers.append(ResnetBlock(c_in, c_out))
        if attn:
            layers.append(AttnBlock(c_out))
        c_in = c_out
    return layers, c_in


def downsample_factor(ch_mult: list[int], stem_stride: int = 1) -> int:
    """Image pixels per code along each side."""
    return 2 ** (len(ch_mult) - 1) * stem_stride


class Encoder(nn.Module):
    def __init__(self, *, image_size: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], z_channels: int, stem_stride: int = 1, in_channels: int = 3):
        super().__init__()
        if stem_stride == 1:
            self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        else:  # 4x4 stride 2, padding 1: H -> H/2, each pixel seen by the same number of taps
            self.conv_in = nn.Conv2d(in_channels, ch, 4, stride=2, padding=1)
        self.levels = nn.ModuleList()
        c, res = ch, image_size // stem_stride
        for i, mult in enumerate(ch_mult):
            blocks, c = _stage(c, ch * mult, num_res_blocks, res in attn_resolutions)
            level = nn.Module()
            level.blocks = blocks
            level.down = Downsample(c) if i < len(ch_mult) - 1 else nn.Identity()
            self.levels.append(level)
            res = res // 2 if i < len(ch_mult) - 1 else res
        self.mid = nn.Sequential(ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c))
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            h = level.down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    def __init__(self, *, image_size: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], z_channels: int, stem_stride: int = 1, out_channels: int = 3):
        super().__init__()
        c = ch * ch_mult[-1]
        res = image_size // downsample_factor(ch_mult, stem_stride)
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c))
        self.levels = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks, c = _stage(c, ch * mult, num_res_blocks + 1, res in attn_resolutions)
            level = nn.Module()
            level.blocks = blocks
            level.up = Upsample(c) if i > 0 else nn.Identity()
            self.levels.append(level)
            res = res * 2 if i > 0 else res
        self.norm_out = group_norm(c)
        if stem_stride == 1:
            self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        else:  # 4x4 stride-2 transposed conv: H/2 -> H straight to pixels
            self.conv_out = nn.ConvTranspose2d(c, out_channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C, h, w)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            h = level.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class RQVAE(nn.Module):
    """Encoder -> quant_conv -> ResidualQuantizer -> post_quant_conv -> Decoder.

    `model_args` (the keyword arguments) rebuild the model; `dnd.tokenizer.load` does so
    from a checkpoint alone.
    """

    def __init__(self, *, image_size: int, ch: int = 32, ch_mult: list[int] = (1, 2, 2),
                 num_res_blocks: int = 1, attn_resolutions: list[int] = (), z_channels: int = 32,
                 embed_dim: int = 32, depth: int = 4, codebook_size: int = 512, shared_codebook: bool = True,
                 ema_decay: float = 0.99, restart_unused: bool = True, commitment: float = 0.25,
                 stem_stride: int = 1):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"RQVAE: stem_stride must be 1 or 2, got {stem_stride!r}")
        factor = downsample_factor(ch_mult, stem_stride)
        if image_size % factor:
            raise ValueError(f"RQVAE: image_size {image_size} is not divisible by the downsampling factor "
                             f"{factor} of ch_mult {list(ch_mult)} and stem_stride {stem_stride}")
        # Checkpoints written before stem_stride existed have no such key and load as stem_stride 1.
        self.model_args = dict(image_size=image_size, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                               attn_resolutions=list(attn_resolutions), z_channels=z_channels, embed_dim=embed_dim,
                               depth=depth, codebook_size=codebook_size, shared_codebook=shared_codebook,
                               ema_decay=ema_decay, restart_unused=restart_unused, commitment=commitment,
                               stem_stride=stem_stride)
        self.image_size, self.grid, self.depth = image_size, image_size // factor, depth
        net = dict(image_size=image_size, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                   attn_resolutions=list(attn_resolutions), z_channels=z_channels, stem_stride=stem_stride)
        self.encoder, self.decoder = Encoder(**net), Decoder(**net)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.quantizer = ResidualQuantizer(dim=embed_dim, codebook_size=codebook_size, depth=depth,
                                           shared_codebook=shared_codebook, ema_decay=ema_decay,
                                           restart_unused=restart_unused, commitment=commitment)

    @classmethod
    def from_config(cls, tok: dict, image_size: int) -> "RQVAE":
        """Build from one validated `tokenizers.<name>` config block."""
        q = tok["quantizer"]
        return cls(image_size=image_size, ch=tok["ch"], ch_mult=tok["ch_mult"], num_res_blocks=tok["num_res_blocks"],
                   attn_resolutions=tok["attn_resolutions"], z_channels=tok["z_channels"], embed_dim=tok["embed_dim"],
                   depth=q["depth"], codebook_size=q["codebook_size"], shared_codebook=q["shared_codebook"],
                   ema_decay=q["ema_decay"], restart_unused=q["restart_unused"], commitment=q["commitment"],
                   stem_stride=int(tok.get("stem_stride", 1)))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> continuous latent, channels-last (B, h, w, embed_dim)."""
        return self.quant_conv(self.encoder(x)).permute(0, 2, 3, 1)

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, h, w, embed_dim) -> image (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(z_q.permute(0, 3, 1, 2).to(self.post_quant_conv.weight.dtype)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, 3, H, W) -> (reconstruction (B, 3, H, W), codes (B, h, w, D), {"commitment": unweighted loss})."""
        z_q, codes, commitment = self.quantizer(self.latent(x))
        return self.decode_latent(z_q), codes, {"commitment": commitment}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> codes int64 (B, h, w, D). Never updates the codebook."""
        z = self.latent(x)
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            _, codes, _ = self.quantizer(z)
        finally:
            self.quantizer.train(was_training)
        return codes

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 (B, h, w, d), d <= D (fewer depths decode the partial sum) -> x (B, 3, H, W)."""
        if codes.ndim != 4:
            raise ValueError(f"decode_codes: expected codes of shape (B, h, w, d), got {tuple(codes.shape)}")
        return self.decode_latent(self.quantizer.decode(codes.long()))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> RQVAE:
    """Rebuild an RQVAE from a checkpoint written by `train_tokenizer` alone (eval mode)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    for key in ("model_args", "model"):
        if key not in ckpt:
            raise KeyError(f"{path}: not a tokenizer checkpoint (no {key!r} entry)")
    model = RQVAE(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.eval()
