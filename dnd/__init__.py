"""dnd: a reference pipeline for 2-D autoregressive image generation (DnD-Transformer, arXiv 2410.01912).

The package is importable without Snakemake; `python -m dnd <stage> --help` lists the
pipeline stages that the Snakemake rules call.
"""
__version__ = "0.1.0"
