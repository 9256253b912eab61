"""Summary statistics of per-episode accuracies: mean and 95% confidence interval (METHOD §3.4)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from smat.io import SmatError

Z_95 = 1.96


@dataclass(frozen=True)
class Summary:
    mean: float
    ci95: float | None   # 1.96 · unbiased std / √n; None for a single value (the std is undefined)
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float], what: str = "values") -> Summary:
    """Mean and 95% CI = 1.96 · std / √n with the unbiased (n − 1) std, as PMF and SMAT report (METHOD §3.4)."""
    n = len(values)
    if n == 0:
        raise SmatError(f"cannot summarise {what}: there are none")
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(mean=mean, ci95=None, n=1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Summary(mean=mean, ci95=Z_95 * math.sqrt(variance) / math.sqrt(n), n=n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Summary:
    """Mean and 95% CI of b[i] − a[i] over paired episodes ("B minus A").

    Pairing removes the episode-to-episode variance that both models share, so the CI of the difference
    is much tighter than the two separate CIs suggest.
    """
    if len(a) != len(b):
        raise SmatError(f"paired difference needs equally many values, got {len(a)} and {len(b)}")
    return summarize([y - x for x, y in zip(a, b)], what="paired differences")


def propagated_ci(ci95s: Sequence[float]) -> float:
    """95% CI of the mean of k independent means with these CIs, √(Σ CI²)/k: the CI of an average over datasets
    (METHOD §3.4). A NaN CI makes the result NaN."""
    return math.sqrt(sum(ci ** 2 for ci in ci95s)) / len(ci95s)


def format_summary(summary: Summary, digits: int = 2) -> str:
    """'84.23 ± 0.61 (n = 600)'; the CI is shown as 'n/a' for a single value."""
    ci = "n/a" if summary.ci95 is None else f"{summary.ci95:.{digits}f}"
    return f"{summary.mean:.{digits}f} ± {ci} (n = {summary.n})"
