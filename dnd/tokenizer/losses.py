"""Tokenizer losses: reconstruction, LPIPS from a local file, hinge PatchGAN with the adaptive weight.

Follows RQ-VAE's trainer (dnd-spec section 1): generator loss = recon + commitment_weight *
commitment + lpips_weight * LPIPS + g_weight * gan_weight * (-mean D(x_rec)), with
g_weight = ||grad nll|| / (||grad L_G|| + 1e-4) taken at the decoder's last conv, clamped to
[0, 1e4] and detached; nll = recon + LPIPS (no commitment term). The discriminator is a
PatchGAN (ndf 64, 2 layers, BatchNorm, LeakyReLU 0.2, N(0, 0.02) init) trained with the
hinge loss, also scaled by gan_weight.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LPIPS_FORMAT = (
    "a torch state dict holding both the torchvision VGG16 weights (keys 'features.*', as in "
    "vgg16-397923af.pth) and the LPIPS v0.1 linear heads (keys 'lin0.model.1.weight' .. "
    "'lin4.model.1.weight', as in the lpips package's weights/v0.1/vgg.pth), e.g. "
    "torch.save({**torch.load('vgg16-397923af.pth'), **torch.load('vgg.pth')}, path)"
)


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(x_rec, x)
    if kind == "l1":
        return F.l1_loss(x_rec, x)
    raise ValueError(f"reconstruction loss {kind!r}: expected 'mse' or 'l1'")


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018, v0.1): distance between unit-normalised VGG16 features.

    Weights come only from `path` (nothing is downloaded); see LPIPS_FORMAT. Frozen, eval mode.
    """

    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of torchvision's vgg16().features
    TAPS = (3, 8, 15, 22, 29)
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, path: str | Path | None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"LPIPS is enabled (loss.lpips_weight > 0) but loss.lpips_path={path!r} is not a file; "
                f"provide {LPIPS_FORMAT}, or set lpips_weight: 0")
        # torchvision vgg16().features up to relu5_3, built without the (large) classifier
        self.features = make_layers(cfgs["D"])[: self.TAPS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                           if k.startswith("features.") and int(k.split(".")[1]) <= self.TAPS[-1]})
            for i, lin in enumerate(self.lins):
                lin.weight.data.copy_(state[f"lin{i}.model.1.weight"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"LPIPS weights {path}: expected {LPIPS_FORMAT}; loading failed: {e}") from e
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> mean LPIPS distance (scalar)."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = x.new_zeros(())
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == self.TAPS[tap]:
                fx, fy = h.chunk(2)
                fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[tap]((fx - fy).pow(2)).mean()
                tap += 1
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix NLayerDiscriminator): logits per patch, (B, 1, h', w')."""

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, 1e4], detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
