"""Stage `extract_codes` and the cached code format it writes (dnd-spec section 2).

A codes folder holds
  codes.npy      int16 (N, A, h, w, D): A views per image (10 with ten-crop: the 4 corners
                 and the centre of an ADM-style centre crop to int(1.1 * S), then the same
                 five of its horizontal flip; else 1, the image itself)
  labels.npy     int64 (N,)
  manifest.json  tokenizer path and sha256, depth, codebook_size, grid, views, num_images;
                 written last, so a folder with a manifest is complete.
Extraction runs in eval mode (no codebook update) over fixed-size shards kept under
`shards/` while it runs; a restarted job skips the shards already written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dnd.checkpoint import atomic_path, save_json, save_npy
from dnd.data import load_split
from dnd.data.image_folder import center_crop_arr
from dnd.data.shards import file_sha256
from dnd.images import to_tensor
from dnd.progress import Progress
from dnd.tokenizer import load

TEN_CROP_VIEWS = 10


def views(images: np.ndarray, size: int, ten_crop: bool) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float views (B, A, 3, size, size) in [-1, 1]."""
    if ten_crop:
        big = np.stack([center_crop_arr(Image.fromarray(img), int(size * 1.1)) for img in images])
        crops = TF.ten_crop(to_tensor(big), [size, size])  # 10 x (B, 3, S, S)
        return torch.stack(crops, dim=1)
    if images.shape[1] != size or images.shape[2] != size:
        images = np.stack([center_crop_arr(Image.fromarray(img), size) for img in images])
    return to_tensor(images).unsqueeze(1)


@torch.no_grad()
def extract_codes(model_path: Path, data_dir: Path, out_dir: Path, *, ten_crop: bool, batch_size: int,
                  shard_size: int, device) -> None:
    """Encode every image of the split in `data_dir` with the tokenizer `model_path` into `out_dir`.

    `batch_size` counts views per forward pass (images per pass = batch_size // views, at least 1).
    """
    model_path, out_dir, device = Path(model_path), Path(out_dir), torch.device(device)
    model = load(model_path, map_location=device)
    split = load_split(data_dir)
    images, labels = split.images, split.labels  # uint8 (N, H, W, 3) memory-mapped, int64 (N,)
    n, size, depth, grid = len(images), model.image_size, model.depth, model.grid
    num_views = TEN_CROP_VIEWS if ten_crop else 1
    manifest = {"tokenizer": str(model_path), "tokenizer_sha256": file_sha256(model_path), "depth": depth,
                "codebook_size": model.quantizer.codebook_size, "grid": [grid, grid], "views": num_views,
                "num_images": n, "image_size": size, "ten_crop": ten_crop, "shard_size": shard_size}
    shard_dir = out_dir / "shards"
    # Shards made by another tokenizer or other settings must not be mixed in.
    meta_path = shard_dir / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) != manifest:
        print(f"extract_codes: {shard_dir} was made with other settings; starting over")
        shutil.rmtree(shard_dir)
    save_json(manifest, meta_path)

    per_pass = max(1, batch_size // num_views)
    num_shards = -(-n // shard_size)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = Progress(range(num_shards), total=num_shards, desc="extract_codes", log_every=1)
    for shard in bar:
        path = shard_dir / f"{shard:06d}.npy"
        if path.is_file():
            continue
        lo, hi = shard * shard_size, min(n, (shard + 1) * shard_size)
        out = np.empty((hi - lo, num_views, grid, grid, depth), dtype=np.int16)
        for start in range(lo, hi, per_pass):
            batch = np.array(images[start:min(hi, start + per_pass)])  # a writable copy of the memory map
            x = views(batch, size, ten_crop)  # (B, A, 3, S, S)
            with autocast:
                codes = model.encode(x.flatten(0, 1).to(device))  # (B * A, h, w, D)
            out[start - lo:start - lo + len(batch)] = codes.reshape(len(batch), num_views, grid, grid, depth).cpu().numpy()
        save_npy(out, path)

    # The finished arrays are assembled inside the work folder and moved into place together,
    # manifest last, so a job killed while assembling leaves only `shards/` behind.
    with atomic_path(shard_dir / "codes.npy") as tmp:
        codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(n, num_views, grid, grid, depth))
        for shard in range(num_shards):
            codes[shard * shard_size:(shard + 1) * shard_size] = np.load(shard_dir / f"{shard:06d}.npy")
        codes.flush()
        del codes
    save_npy(labels, shard_dir / "labels.npy")
    for name in ("codes.npy", "labels.npy"):
        (shard_dir / name).replace(out_dir / name)
    save_json(manifest, out_dir / "manifest.json")
    shutil.rmtree(shard_dir)


def load_codes(codes_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(codes int16 (N, A, h, w, D) memory-mapped, labels int64 (N,), manifest) of a codes folder."""
    codes_dir = Path(codes_dir)
    manifest_path = codes_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: missing; {codes_dir} is not a finished extract_codes output")
    manifest = json.loads(manifest_path.read_text())
    for name in ("codes.npy", "labels.npy"):
        if not (codes_dir / name).is_file():
            raise FileNotFoundError(f"{codes_dir / name}: missing although {manifest_path} exists")
    codes = np.load(codes_dir / "codes.npy", mmap_mode="r")
    labels = np.load(codes_dir / "labels.npy")
    expected = (manifest["num_images"], manifest["views"], *manifest["grid"], manifest["depth"])
    if codes.dtype != np.int16 or codes.shape != expected:
        raise ValueError(f"{codes_dir / 'codes.npy'}: expected int16 {expected} (from the manifest), "
                         f"got {codes.dtype} {codes.shape}")
    if labels.shape != (manifest["num_images"],):
        raise ValueError(f"{codes_dir / 'labels.npy'}: expected shape ({manifest['num_images']},), got {labels.shape}")
    return codes, labels.astype(np.int64), manifest


class CodeDataset(torch.utils.data.Dataset):
    """Items `(codes int64 (h*w, depth) in row-major order, label int64 scalar)` of a codes folder.

    Each item takes one of the A stored views at random: from `generator` when given
    (for a single-process loader; worker processes would each copy it and draw alike),
    else from torch's global RNG, which DataLoader seeds differently in every worker.
    `depth` keeps the first `depth` code depths (None = all).
    """

    def __init__(self, codes_dir: Path, depth: int | None = None, *, generator: torch.Generator | None = None):
        self.codes, self.labels, self.manifest = load_codes(codes_dir)
        full = self.manifest["depth"]
        self.depth = full if depth is None else depth
        if not 1 <= self.depth <= full:
            raise ValueError(f"CodeDataset: depth {depth} requested but {codes_dir} holds {full} depths")
        self.generator = generator

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.codes.shape[1]
        view = int(torch.randint(views, (), generator=self.generator)) if views > 1 else 0
        codes = np.asarray(self.codes[i, view, :, :, :self.depth], dtype=np.int64)  # (h, w, depth)
        return torch.from_numpy(codes.reshape(-1, self.depth)), torch.tensor(self.labels[i], dtype=torch.int64)
