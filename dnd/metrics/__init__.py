"""Evaluation metrics, offline: FID family (torch-fidelity), OCR legibility (easyocr), PPL-OCR."""
from dnd.metrics.fid import extract_features, fid, fid_from_features, load_features, reference_stats
from dnd.metrics.ngram import CharNgramLM
from dnd.metrics.ocr import ocr_scores, text_scores

__all__ = ["CharNgramLM", "extract_features", "fid", "fid_from_features", "load_features", "ocr_scores",
           "reference_stats", "text_scores"]
