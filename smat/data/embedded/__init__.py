"""Offline multi-domain few-shot benchmark: procedurally generated domains plus scikit-learn's digits."""

from smat.data.embedded.build import DOMAINS, SIZES, build_embedded

__all__ = ["DOMAINS", "SIZES", "build_embedded"]
