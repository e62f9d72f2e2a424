"""Comparison reports of an experiment: tables (pandas), plots (matplotlib), HTML + PDF."""
from dnd.report.render import render_report

__all__ = ["render_report"]
