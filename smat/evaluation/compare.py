"""`smat compare A.csv B.csv`: paired difference "B minus A" of two evaluations on the same frozen episodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smat.evaluation.results import check_same_sha256, read_results, recorded_inputs
from smat.evaluation.stats import Summary, format_summary, paired_difference, summarize
from smat.io import SmatError


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Paired accuracy difference B − A on the episodes both files share (matched by episode index).

    Both files must come from the same dataset and, where their summaries record it, the same episodes file;
    a shared episode must have the same ways and support/query sizes in both, otherwise the files were not
    evaluated on the same episodes and pairing them would be meaningless.
    """
    rows_a, rows_b = read_results(a), read_results(b)
    dataset_a, dataset_b = _single(rows_a, "dataset", a), _single(rows_b, "dataset", b)
    if dataset_a != dataset_b:
        raise SmatError(f"{a} is on dataset {dataset_a!r} but {b} is on {dataset_b!r}: compare results "
                        "on the same dataset")
    check_same_sha256([(path, recorded_inputs(path).get("episodes_sha256")) for path in (a, b)], "episode files",
                      "a paired comparison needs the same episodes")
    by_episode_a = {row["episode"]: row for row in rows_a}
    by_episode_b = {row["episode"]: row for row in rows_b}
    shared = sorted(set(by_episode_a) & set(by_episode_b))
    if not shared:
        raise SmatError(f"{a} and {b} share no episode index: nothing to compare")
    for episode in shared:
        for key in ("ways", "support_size", "query_size"):
            if by_episode_a[episode][key] != by_episode_b[episode][key]:
                raise SmatError(
                    f"episode {episode} has {key} {by_episode_a[episode][key]} in {a} but "
                    f"{by_episode_b[episode][key]} in {b}: the files were not evaluated on the same episodes")
    acc_a = [by_episode_a[e]["accuracy"] for e in shared]
    acc_b = [by_episode_b[e]["accuracy"] for e in shared]
    return {
        "dataset": dataset_a,
        "label_a": _single(rows_a, "label", a),
        "label_b": _single(rows_b, "label", b),
        "a": summarize(acc_a),
        "b": summarize(acc_b),
        "difference": paired_difference(acc_a, acc_b),
    }


def compare_files(a: Path, b: Path) -> str:
    """Human-readable report of `compare(a, b)`: both accuracies and the paired difference B − A with its CI."""
    result = compare(Path(a), Path(b))
    diff: Summary = result["difference"]
    verdict = ""
    if diff.ci95 is not None:
        low, high = diff.mean - diff.ci95, diff.mean + diff.ci95
        verdict = ("B is better" if low > 0 else "A is better" if high < 0 else "no significant difference")
        verdict = f" [95% CI {low:+.2f} .. {high:+.2f}: {verdict}]"
    return "\n".join([
        f"dataset {result['dataset']}, {diff.n} shared episodes",
        f"A  {result['label_a']:<20} {format_summary(result['a'])}  ({a})",
        f"B  {result['label_b']:<20} {format_summary(result['b'])}  ({b})",
        f"B minus A: {diff.mean:+.2f} ± {'n/a' if diff.ci95 is None else f'{diff.ci95:.2f}'}{verdict}",
    ])


def _single(rows: list[dict[str, Any]], key: str, path: Path) -> str:
    values = sorted({row[key] for row in rows})
    if len(values) != 1:
        raise SmatError(f"{path}: expected one {key} per result file, found {values}")
    return values[0]
