"""One training loop for every generator (DnD, 1-D AR, RQ-Transformer): the `train_generator` stage.

The loop is the same for the three kinds; only `dnd.generators.build` differs. An
optimizer step consumes `grad_accum` micro-batches of `batch_size` code sequences
(the effective batch is their product). Master weights stay in fp32; on CUDA the
forward runs under bf16 autocast. EMA weights are kept in fp32 and are what
`dnd.generators.load` (and so the `sample` stage) uses.

Resume guarantee: a run killed after any checkpoint and restarted gives bit-for-bit
the weights of an uninterrupted run (on the same device and software). Nothing
random depends on how far a process got: the batch order and the augmented view of
every sample come from (seed, sample position), and the global RNG (dropout, label
dropout) is reseeded from (seed, step) before every step.

Multi-GPU: launched by `torchrun --nproc_per_node N -m dnd train_generator ...`, every
process takes its slice of the same global batch (`batch_size` is global) and the
gradients are averaged over processes, so N processes follow the same trajectory as one
(up to float reduction order). `train.parallel` picks how: `ddp` replicates the model,
`fsdp` shards weights, gradients, optimizer state and EMA over the processes (one FSDP
unit per transformer block). Only rank 0 writes checkpoints, `losses.csv` and MLflow.
Checkpoints hold full, unsharded tensors keyed by parameter name (model, EMA and AdamW
state alike, gathered from every process), so a run resumes with any number of
processes and either parallel mode.

Per-step losses are buffered on the device and read back every `log_every` steps
and before every checkpoint, so a step never waits for the GPU just to log; a
non-finite loss is still reported with the exact step, and no checkpoint is written
after it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from dnd import distributed, generators
from dnd.checkpoint import load_checkpoint, rng_state, save_checkpoint, save_text
from dnd.codes import load_codes
from dnd.config import code_depth, config_hash, generator_trajectory
from dnd.generators.backbone import Block
from dnd.progress import Progress
from dnd.runtime import stage_seed
from dnd.tracking import NullTracker


# ----------------------------------------------------------------------------- optimisation pieces

def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices and embedding tables (ndim >= 2), none on norms, biases, other 1-D."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, *, lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """LR for the 0-based optimizer step `step`: linear warmup, then constant or cosine decay to 0 at the end."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"generator train.schedule: expected 'constant' or 'cosine', got {schedule!r}")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """fp32 exponential moving average of a model's state dict (parameters averaged, buffers copied).

    `shadow` has exactly the keys of `model.state_dict()`, so it loads strictly into a
    freshly built model. Under FSDP the shadow tensors are sharded like the parameters
    (DTensors): each process averages only its own shard.

    Warm-up: update t (from 0) uses min(decay, (1 + t) / (10 + t)), as diffusers' EMAModel
    does. A constant 0.999 from a copy of the initial weights keeps 0.999^1000 = 37% of the
    random initialisation after 1,000 steps (the reference's 0.9999 is meant for ~10^5-10^6
    steps), and the sampled weights are then mostly untrained; with the warm-up the initial
    weights' share is below 1e-20 after 1,000 steps, and the average covers about the last
    tenth of training until the decay cap takes over.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        state = model.state_dict()
        param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.shadow = {k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone())
                       for k, v in state.items()}
        # References stay valid: the optimizer updates parameters in place.
        self._averaged = [k for k, v in state.items() if k in param_names and v.is_floating_point()]
        self._sources = [state[k] for k in self._averaged]
        self._copied = [(k, state[k]) for k in state if k not in set(self._averaged)]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        targets = [self.shadow[k] for k in self._averaged]
        sources = [s if s.dtype == torch.float32 else s.float() for s in self._sources]
        torch._foreach_lerp_(targets, sources, 1.0 - self.current_decay())
        self.updates += 1
        for k, src in self._copied:
            self.shadow[k].copy_(src)

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.updates = updates
        missing, unexpected = state.keys() - self.shadow.keys(), self.shadow.keys() - state.keys()
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: unexpected {sorted(missing)[:5]}, "
                           f"missing {sorted(unexpected)[:5]}")
        for k, v in state.items():
            target = self.shadow[k]
            if isinstance(target, DTensor):  # keep this process's shard of the full tensor
                v = distribute_tensor(v.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
            target.copy_(v)

    def full_state(self) -> dict:
        """The shadow as full tensors (a collective under FSDP: every process must call it)."""
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.shadow.items()}


class TrainStep:
    """One optimizer step of any generator: forward/backward over micro-batches, clip, AdamW, EMA.

    Used by `train_generator` and by `benchmarks/bench_training.py`, so the benchmark
    measures exactly the training code.
    """

    def __init__(self, model: torch.nn.Module, *, lr: float, betas, weight_decay: float, grad_clip: float,
                 ema_decay: float, compile: bool, device: torch.device, parallel: str = "ddp"):
        self.model, self.device, self.grad_clip = model, device, grad_clip
        self.sharded = parallel == "fsdp" and distributed.world_size() > 1
        wrapped = model
        if self.sharded:  # in place: parameters become DTensor shards, gradients reduce-scattered in backward
            distributed.fully_shard_blocks(model, Block)
        elif distributed.world_size() > 1:  # gradients all-reduced during backward
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(wrapped) if compile else wrapped
        self.optimizer = torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr, betas=tuple(betas),
                                           fused=device.type == "cuda")
        self.ema = EMA(model, ema_decay)

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor | None]], lr: float) -> torch.Tensor:
        """Returns the detached losses (1 + D,): total, then one per depth, averaged over micro-batches."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        losses = None
        for i, (codes, cond) in enumerate(micro_batches):  # codes (B, L, D), cond (B,) | None
            last = i == len(micro_batches) - 1
            if self.sharded:  # reduce-scatter gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or not hasattr(self.forward, "no_sync") else self.forward.no_sync()
            with sync, torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                _, loss = self.forward(codes, cond)
                (loss / len(micro_batches)).backward()
            step_losses = torch.cat([loss.detach().float().reshape(1), depth_losses(self.model)])  # (1 + D,)
            losses = step_losses if losses is None else losses + step_losses
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        return losses / len(micro_batches)

    def state(self) -> dict:
        """Full model, EMA and optimizer state, keyed by parameter name, on the CPU of rank 0.

        A collective (every process must call it); the other ranks get partial or empty dicts.
        """
        gathered = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"model": get_model_state_dict(self.model, options=gathered),
                "ema": {k: v.cpu() for k, v in self.ema.full_state().items()}, "ema_updates": self.ema.updates,
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=gathered)}

    def load_state(self, state: dict) -> None:
        """Load what `state()` returned (every process loads the full tensors and keeps its share)."""
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=full)
        self.ema.load_state_dict(state["ema"], state["ema_updates"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)


def depth_losses(model: torch.nn.Module) -> torch.Tensor:
    """Per-depth cross-entropy (D,) of the model's last forward, detached."""
    return model.last_depth_losses.detach().float()


# ----------------------------------------------------------------------------- data

class CodeBatches:
    """Deterministic batches from a codes folder: batch `i` depends only on (seed, i).

    The sample order is a fresh permutation per epoch (seeded by seed and epoch), and
    every sample's augmented view is drawn from (seed, its position in the stream),
    so resuming at any step reproduces the batches of an uninterrupted run.
    """

    def __init__(self, codes_dir: Path, *, depth: int, batch_size: int, seed: int):
        self.codes, self.labels, self.manifest = load_codes(codes_dir)
        n, self.views, h, w, tok_depth = self.codes.shape
        if depth > tok_depth:
            raise ValueError(f"{codes_dir}/codes.npy: has {tok_depth} code depths, the generator needs {depth}")
        self.num_samples, self.grid, self.depth = n, (h, w), depth
        self.batch_size, self.seed = batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            rng = np.random.default_rng([self.seed, 0, epoch])
            self._perms[epoch] = rng.permutation(self.num_samples)
        return self._perms[epoch]

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Micro-batch `index` of the stream -> codes int64 (B, h*w, D), labels int64 (B,)."""
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        epochs, within = np.divmod(positions, self.num_samples)
        samples = np.array([self._permutation(e)[i] for e, i in zip(epochs, within)])
        views = np.random.default_rng([self.seed, 1, index]).integers(0, self.views, len(positions))
        order = np.argsort(samples, kind="stable")  # sorted reads from the memory map
        codes = np.empty((len(positions), *self.codes.shape[2:4], self.depth), np.int64)
        codes[order] = self.codes[samples[order], views[order], :, :, :self.depth]
        b, h, w, d = codes.shape
        return codes.reshape(b, h * w, d), self.labels[samples].astype(np.int64)


# ----------------------------------------------------------------------------- the stage

def build_from_config(gen: dict, *, depth: int, codebook_size: int, grid: int, num_classes: int,
                      codebook: torch.Tensor | None = None) -> torch.nn.Module:
    """Build the generator a config entry describes (only the options its kind has)."""
    kind = gen["kind"]
    extra = dict(gen["overrides"])
    if kind == "dnd":
        extra.update(head_layers=gen["head_layers"], heads=gen["heads"])
    elif kind == "ar1d":
        extra.update(flatten=gen["flatten"])
    elif kind == "rqt":
        extra.update(depth_layers=gen["depth_layers"], soft_targets=gen["soft_targets"])
        if gen["soft_targets"] > 0:
            extra.update(codebook=codebook)
    return generators.build(kind, gen["size"], depth=depth, codebook_size=codebook_size, grid=grid,
                            num_classes=num_classes, **extra)


def _tokenizer_codebook(tokenizer_path: Path | None, gen_name: str) -> torch.Tensor:
    if tokenizer_path is None:
        raise ValueError(f"generators.{gen_name}.soft_targets > 0 needs the tokenizer model "
                         f"(tokenizer_path / --tokenizer-model) for the codebook distances")
    from dnd.tokenizer import load as load_tokenizer
    return load_tokenizer(tokenizer_path).quantizer.codebook(0).detach().float().cpu()


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _read_rows(path: Path, up_to_step: int) -> list[list]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        return [[int(r[0]), *map(float, r[1:])] for r in reader if r and int(r[0]) <= up_to_step]


def train_generator(cfg: dict, gen_name: str, codes_dir: Path, out_path: Path, *, num_classes: int,
                    device, tracker=None, tokenizer_path: Path | None = None) -> None:
    """Train generator `gen_name` of the experiment on a codes folder; writes `out_path` (model.pt).

    Beside `out_path`: `resume.pt` (every `ckpt_every` steps; removed once model.pt is
    written) and `losses.csv` (step, loss, loss_d0..loss_d{D-1}, lr).
    """
    tracker = tracker or NullTracker()
    device = distributed.init(torch.device(device))
    main = distributed.is_main()
    codes_dir, out_path = Path(codes_dir), Path(out_path)
    gen = cfg["generators"][gen_name]
    tc = gen["train"]
    depth = code_depth(cfg, gen)
    seed = stage_seed(cfg["seed"], "generator", gen_name)

    data = CodeBatches(codes_dir, depth=depth, batch_size=tc["batch_size"], seed=seed)
    if data.grid[0] != data.grid[1]:
        raise ValueError(f"{codes_dir}/codes.npy: code grid {data.grid} is not square")
    codebook_size = int(data.manifest["codebook_size"])
    codebook = _tokenizer_codebook(tokenizer_path, gen_name) if gen["kind"] == "rqt" and gen["soft_targets"] > 0 \
        else None

    torch.manual_seed(seed)  # initial weights
    model = build_from_config(gen, depth=depth, codebook_size=codebook_size, grid=data.grid[0],
                              num_classes=num_classes, codebook=codebook).to(device)
    for module in model.modules():  # recompute activations in backward (XXL and larger)
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = tc["activation_checkpointing"]
    trainer = TrainStep(model, lr=tc["lr"], betas=tc["betas"], weight_decay=tc["weight_decay"],
                        grad_clip=tc["grad_clip"], ema_decay=tc["ema_decay"], compile=tc["compile"], device=device,
                        parallel=tc["parallel"])
    if distributed.world_size() > 1 and main:
        total = sum(p.numel() for p in model.parameters())
        held = sum(p.to_local().numel() for p in model.parameters()) if trainer.sharded else total
        print(f"train_generator {gen_name}: {'FSDP' if trainer.sharded else 'DDP'} over {distributed.world_size()} "
              f"processes, {held:,} of {total:,} parameters held by rank 0", file=sys.stderr)

    resume_path = out_path.parent / "resume.pt"
    losses_path = out_path.parent / "losses.csv"
    header = ["step", "loss", *[f"loss_d{d}" for d in range(depth)], "lr"]
    # A resume.pt from another config, class count or codes folder (e.g. a retrained tokenizer) is not ours;
    # one from a run that only executed differently (parallel mode, compile, checkpoint cadence) is.
    # "ema": resume.pt files from before the EMA warm-up hold a differently averaged shadow.
    resume_key = config_hash({"gen": generator_trajectory(gen), "seed": cfg["seed"], "model_args": model.model_args,
                              "codes": data.manifest, "ema": "warmup"})
    start, rows = 0, []
    if resume_path.is_file():
        ckpt = load_checkpoint(resume_path, map_location=device)
        if ckpt.get("resume_key") == resume_key:
            trainer.load_state(ckpt)
            start = int(ckpt["step"])
            rows = _read_rows(losses_path, start)
            print(f"train_generator {gen_name}: resuming from {resume_path} at step {start}", file=sys.stderr)
        else:
            print(f"train_generator {gen_name}: ignoring {resume_path} (written for another config)",
                  file=sys.stderr)

    def checkpoint(step: int) -> dict:  # a collective: every process calls it, rank 0 saves it
        return {"config": cfg, "model_args": model.model_args, **trainer.state(), "step": step,
                "rng": rng_state(), "resume_key": resume_key}

    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, losses on device) not yet read back
    saved_step = start if start > 0 else None

    def flush() -> None:
        if not pending:
            return
        values = distributed.all_reduce_mean(torch.stack([p[2] for p in pending])).cpu().numpy()  # (n, 1 + D)
        for (step, lr, _), v in zip(pending, values):
            if not np.isfinite(v).all():
                last = (f"the last good checkpoint {resume_path} (step {saved_step}) is untouched"
                        if saved_step is not None else "no checkpoint had been written yet")
                raise RuntimeError(f"train_generator {gen_name}: non-finite loss {v[0]} (per depth {v[1:].tolist()}) "
                                   f"at step {step}; stopped, {last}. Lower the lr or check the codes.")
            rows.append([step, *map(float, v), lr])
        window = np.mean(values, axis=0)
        tracker.log_metrics({"loss": float(window[0]), **{f"loss_d{d}": float(x) for d, x in enumerate(window[1:])},
                             "lr": pending[-1][1]}, step=pending[-1][0])
        progress.set(loss=float(values[-1][0]))
        pending.clear()

    progress = Progress(range(start, tc["steps"]), total=tc["steps"], initial=start, desc=f"train {gen_name}",
                        log_every=tc["log_every"])
    for step in progress:
        torch.manual_seed(stage_seed(seed, "step", str(step)))  # dropout and label dropout of this step
        micro = []
        for m in range(tc["grad_accum"]):
            codes, labels = data.batch(step * tc["grad_accum"] + m)  # the global micro-batch
            codes, labels = distributed.shard(codes), distributed.shard(labels)  # this process's rows
            codes_t = torch.from_numpy(codes).to(device, non_blocking=True)  # (B, L, D)
            cond = torch.from_numpy(labels).to(device, non_blocking=True) if num_classes > 0 else None
            micro.append((codes_t, cond))
        lr = learning_rate(step, lr=tc["lr"], warmup_steps=tc["warmup_steps"], total_steps=tc["steps"],
                           schedule=tc["schedule"])
        pending.append((step + 1, lr, trainer(micro, lr)))
        done = step + 1
        if done % tc["log_every"] == 0:
            flush()
        if done % tc["ckpt_every"] == 0 and done < tc["steps"]:
            flush()
            state = checkpoint(done)
            if main:
                save_text(_csv_text(header, rows), losses_path)
                save_checkpoint(state, resume_path)
            saved_step = done
    flush()
    state = checkpoint(tc["steps"])
    if main:
        save_text(_csv_text(header, rows), losses_path)
        save_checkpoint(state, out_path)
        resume_path.unlink(missing_ok=True)
    distributed.barrier()
