"""Sparse MeTa-Tuning (SMAT): sparse interpolated experts for few-shot generalisation."""

__version__ = "0.1.0"
