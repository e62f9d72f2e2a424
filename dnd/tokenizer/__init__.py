"""RQ-VAE tokenizer: images <-> residual codes (B, h, w, D). See DESIGN.md for the public API."""
from dnd.tokenizer.model import RQVAE, load
from dnd.tokenizer.quantizer import ResidualQuantizer

__all__ = ["RQVAE", "ResidualQuantizer", "load"]
