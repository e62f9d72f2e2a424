"""Stage `train_tokenizer` (and the `reconstruct` metrics stage) for the RQ-VAE.

Resume contract: the batch of step s is a pure function of (seed, s) (`batch_indices`),
and `resume.pt` holds the model with its codebook buffers, both optimizers, the
discriminator, the RNG state and the log, so a run killed after a checkpoint and
restarted ends with the same weights as an uninterrupted run on the same device.

Multi-process: under `torchrun`, `batch_size` is global and each process takes its
slice; the encoder/decoder (and discriminator) gradients are averaged by DDP and the
codebook EMA statistics are all-reduced inside the quantizer, so the processes hold one
model. Only rank 0 writes checkpoints, the log and MLflow; the logged loss terms are
rank 0's slice. Dead-code restarts draw from rank 0's slice, so with restarts on, N
processes are not bit-equivalent to one.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch

from dnd import distributed
from dnd.checkpoint import load_checkpoint, rng_state, save_checkpoint, save_json, save_npy, save_text, set_rng_state
from dnd.config import config_hash
from dnd.data import load_split
from dnd.images import to_tensor, to_uint8
from dnd.metrics.recon import code_usage, psnr_per_image, recon_metrics
from dnd.progress import Progress
from dnd.runtime import seed_everything, stage_seed
from dnd.tokenizer.losses import (LPIPS, PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss,
                                  reconstruction_loss)
from dnd.tokenizer.model import RQVAE, load
from dnd.tracking import NullTracker

LOG_COLUMNS = ("step", "lr", "loss", "recon", "commitment", "lpips", "g_loss", "g_weight", "d_loss", "usage")


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Indices of the batch of `step`: epochs are seeded permutations of range(n), read in order."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)  # (B,) positions in the endless stream
    epochs = positions // n
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % n]
    return out


def learning_rate(step: int, train: dict) -> float:
    """Linear warmup to `lr`, then constant or cosine down to `min_lr_ratio * lr`."""
    lr, warmup = train["lr"], train["warmup_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if train["schedule"] == "constant":
        return lr
    progress = (step - warmup) / max(1, train["steps"] - warmup)
    low = lr * train["min_lr_ratio"]
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class TokenizerTrainer:
    """Model, optional discriminator and LPIPS, optimizers, and one training step."""

    def __init__(self, tok: dict, image_size: int, device: str | torch.device):
        self.tok, self.device = tok, torch.device(device)
        self.train_cfg, self.loss_cfg = tok["train"], tok["loss"]
        self.model = RQVAE.from_config(tok, image_size).to(self.device)
        self.forward = self._wrap(self.model)
        betas = tuple(self.train_cfg["betas"])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.train_cfg["lr"], betas=betas,
                                           weight_decay=self.train_cfg["weight_decay"])
        self.lpips = LPIPS(self.loss_cfg["lpips_path"]).to(self.device) if self.loss_cfg["lpips_weight"] > 0 else None
        self.disc = self.disc_optimizer = None
        if self.loss_cfg["gan_weight"] > 0:
            self.disc = PatchDiscriminator().to(self.device)
            self.disc_forward = self._wrap(self.disc)
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=self.train_cfg["lr"], betas=betas,
                                                    weight_decay=self.train_cfg["weight_decay"])

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if distributed.world_size() == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def autocast(self):
        # bf16 on CUDA only: CPU autocast is slow and changes the numbers the tests pin.
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def step(self, images: np.ndarray, step: int) -> dict[str, float]:
        """One optimisation step on uint8 images (B, H, W, 3); returns the loss terms as floats."""
        lr = learning_rate(step, self.train_cfg)
        for opt in (self.optimizer, self.disc_optimizer):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
        x = to_tensor(images, self.device)  # (B, 3, H, W)
        gan = self.disc is not None and step >= self.loss_cfg["disc_start"]
        self.model.train()
        with self.autocast():
            x_rec, codes, losses = self.forward(x)
            x_rec = x_rec.float()
            recon = reconstruction_loss(x_rec, x, self.loss_cfg["recon"])
            lpips = self.lpips(x_rec, x) if self.lpips is not None else recon.new_zeros(())
            nll = recon + self.loss_cfg["lpips_weight"] * lpips
            loss = nll + self.model.quantizer.commitment * losses["commitment"]
            g_loss = g_weight = recon.new_zeros(())
            if gan:
                g_loss = hinge_g_loss(self.disc_forward(x_rec))
                g_weight = adaptive_weight(nll, g_loss, self.model.decoder.conv_out.weight)
                loss = loss + g_weight * self.loss_cfg["gan_weight"] * g_loss
        # Every process must agree to stop, or the others would wait forever in the next all-reduce.
        if distributed.all_reduce_sum((~torch.isfinite(loss.detach())).float()).item() > 0:
            raise FloatingPointError(f"non-finite tokenizer loss {loss.item()} (recon {recon.item()}, "
                                     f"commitment {losses['commitment'].item()})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._clip(self.model.parameters())
        self.optimizer.step()
        d_loss = recon.new_zeros(())
        if gan:
            self.disc.train()
            with self.autocast():
                d_loss = self.loss_cfg["gan_weight"] * hinge_d_loss(self.disc_forward(x),
                                                                    self.disc_forward(x_rec.detach()))
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self._clip(self.disc.parameters())
            self.disc_optimizer.step()
        used = codes.reshape(-1, codes.shape[-1]).unique().numel() / self.model.quantizer.codebook_size
        return {"lr": lr, "loss": loss.item(), "recon": recon.item(), "commitment": losses["commitment"].item(),
                "lpips": lpips.item(), "g_loss": g_loss.item(), "g_weight": g_weight.item(),
                "d_loss": d_loss.item(), "usage": used}

    def _clip(self, params) -> None:
        if self.train_cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, self.train_cfg["grad_clip"])

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "disc": self.disc.state_dict() if self.disc is not None else None,
                "disc_optimizer": self.disc_optimizer.state_dict() if self.disc is not None else None}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def train_tokenizer(cfg: dict, tok_name: str, data_dir: Path, out_path: Path, *, device,
                    tracker=None) -> None:
    """Train tokenizer `tok_name` of the validated config `cfg` on the split in `data_dir`.

    Writes `out_path` (self-describing checkpoint) and `train_log.csv` beside it; keeps
    `resume.pt` beside it every `ckpt_every` steps and resumes from it when present and
    made by the same tokenizer config and seed (it is removed once `out_path` is written).
    """
    tracker = tracker or NullTracker()
    out_path = Path(out_path)
    tok = cfg["tokenizers"][tok_name]
    train = tok["train"]
    device = distributed.init(torch.device(device))
    main = distributed.is_main()
    images = load_split(data_dir).images  # uint8 (N, H, W, 3), memory-mapped
    seed = stage_seed(cfg["seed"], "tokenizer", tok_name)
    seed_everything(seed)
    trainer = TokenizerTrainer(tok, images.shape[1], device)
    resume_path = out_path.parent / "resume.pt"
    identity = {"tokenizer": config_hash(tok), "seed": seed, "num_images": len(images)}
    step, rows = 0, []
    if resume_path.is_file():
        ckpt = load_checkpoint(resume_path, map_location=trainer.device)
        if ckpt.get("identity") == identity:
            trainer.load_state(ckpt)
            step, rows = ckpt["step"], list(ckpt["log"])
            set_rng_state(ckpt["rng"])
            print(f"tokenizer {tok_name}: resuming from {resume_path} at step {step}")
        else:
            print(f"tokenizer {tok_name}: ignoring {resume_path} (made by another config, seed or data)")

    def checkpoint(done: int) -> dict:
        return {"config": cfg, "tokenizer_name": tok_name, "model_args": trainer.model.model_args, "step": done,
                "ema": None,  # no weight EMA for the tokenizer; the codebook EMA lives in the model buffers
                "rng": rng_state(), "log": rows, "identity": identity, "data_seed": seed, **trainer.state()}

    log_path = out_path.parent / "train_log.csv"
    bar = Progress(range(step, train["steps"]), total=train["steps"], initial=step, desc=f"tokenizer {tok_name}",
                   log_every=train["log_every"])
    for step in bar:
        batch = images[np.sort(distributed.shard(batch_indices(seed, step, train["batch_size"], len(images))))]
        try:
            terms = trainer.step(batch, step)
        except FloatingPointError as e:
            kept = f"the last good checkpoint {resume_path} is kept" if resume_path.is_file() else "no checkpoint yet"
            raise RuntimeError(f"tokenizer {tok_name}: step {step}: {e}; stopping ({kept})") from e
        bar.set(loss=terms["loss"], recon=terms["recon"])
        done = step + 1
        if done % train["log_every"] == 0 or done == train["steps"]:
            rows.append({"step": done, **terms})
            tracker.log_metrics({f"tokenizer/{k}": v for k, v in terms.items()}, step=done)
        if done % train["ckpt_every"] == 0 and done < train["steps"] and main:
            save_checkpoint(checkpoint(done), resume_path)
            save_text(_csv(rows), log_path)
    if main:
        save_text(_csv(rows), log_path)
        save_checkpoint(checkpoint(train["steps"]), out_path)  # the stage's output, written last
        resume_path.unlink(missing_ok=True)
    distributed.barrier()


@torch.no_grad()
def reconstruct(model_path: Path, data_dir: Path, out_dir: Path, *, device, batch_size: int = 64) -> dict:
    """Reconstruct a split; write `recon.npy` (uint8) and `recon_metrics.json` into `out_dir`.

    Metrics: PSNR, SSIM, L2 (MSE in [-1, 1] units) of the full-depth reconstruction, and
    per depth d = 1..D the codebook usage and perplexity of the depth-d codes and the PSNR of
    the partial sum of depths 1..d.
    """
    device = torch.device(device)
    model = load(model_path, map_location=device)
    images = load_split(data_dir).images  # uint8 (N, H, W, 3), memory-mapped
    depth, n = model.depth, len(images)
    recon = np.empty_like(images)
    codes_all = np.empty((n, model.grid, model.grid, depth), dtype=np.int16)
    partial_psnr = np.empty((depth, n))
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in Progress(range(0, n, batch_size), total=-(-n // batch_size), desc="reconstruct"):
            real = np.array(images[start:start + batch_size])  # a writable copy of the memory map
            codes = model.encode(to_tensor(real, device))  # (B, h, w, D)
            codes_all[start:start + len(real)] = codes.cpu().numpy()
            for d in range(1, depth + 1):
                fake = to_uint8(model.decode_codes(codes[..., :d]))
                partial_psnr[d - 1, start:start + len(real)] = psnr_per_image(real, fake)
            recon[start:start + len(real)] = fake
    metrics = recon_metrics(np.asarray(images), recon)
    usage = code_usage(codes_all, model.quantizer.codebook_size)
    metrics.update({
        "num_images": n, "depth": depth, "codebook_size": model.quantizer.codebook_size,
        "per_depth": [{"depth": d + 1, **usage[d], "psnr_partial": float(partial_psnr[d].mean())} for d in range(depth)],
        "usage_any_depth": float(np.isin(np.arange(model.quantizer.codebook_size), codes_all).mean()),
    })
    out_dir = Path(out_dir)
    save_npy(recon, out_dir / "recon.npy")
    save_json(metrics, out_dir / "recon_metrics.json")
    return metrics
