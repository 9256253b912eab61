"""Statistics of evaluation results: the 95% CI formula, paired differences, `smat compare`."""

from __future__ import annotations

import concurrent.futures
import math
import shutil

import numpy as np
import pytest
import torch

from smat.evaluation.compare import compare, compare_files
from smat.evaluation.results import EVAL_COLUMNS, read_results, read_summary, summary_path, write_results
from smat.evaluation.select_lr import best_lr
from smat.evaluation.stats import paired_difference, summarize
from smat.io import SmatError, sha256_file


def test_ci95_is_196_unbiased_std_over_sqrt_n():
    values = [50.0, 60.0, 70.0, 80.0]
    summary = summarize(values)
    # mean 65, unbiased variance = (225 + 25 + 25 + 225) / 3
    assert summary.mean == pytest.approx(65.0)
    assert summary.ci95 == pytest.approx(1.96 * math.sqrt(500 / 3) / 2)
    assert summary.n == 4
    # The same as torch's unbiased std, which PMF and SMAT use (METHOD §3.4).
    rng = np.random.default_rng(0)
    sample = rng.uniform(20, 100, size=600).tolist()
    expected = 1.96 * torch.tensor(sample, dtype=torch.float64).std().item() / math.sqrt(600)
    assert summarize(sample).ci95 == pytest.approx(expected, rel=1e-12)


def test_single_value_has_no_ci_and_empty_is_an_error():
    assert summarize([42.0]).ci95 is None
    with pytest.raises(SmatError, match="none"):
        summarize([])


def test_paired_difference_removes_shared_episode_variance():
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(30, 90, size=200)
    a = difficulty + rng.normal(0, 1, size=200)
    b = difficulty + 2.0 + rng.normal(0, 1, size=200)
    diff = paired_difference(a.tolist(), b.tolist())
    assert diff.mean == pytest.approx(float(np.mean(b - a)))
    assert diff.ci95 == pytest.approx(1.96 * float(np.std(b - a, ddof=1)) / math.sqrt(200))
    # Far tighter than the unpaired CIs, and it finds the +2 effect.
    assert diff.ci95 < summarize(a.tolist()).ci95 / 5
    assert diff.mean - diff.ci95 > 0
    with pytest.raises(SmatError, match="equally many"):
        paired_difference([1.0, 2.0], [1.0])


def test_best_lr_takes_the_first_of_ties_and_needs_strictly_greater():
    assert best_lr([0.0, 1e-4, 1e-3], [50.0, 50.0, 49.0]) == 0.0
    assert best_lr([0.0, 1e-4, 1e-3], [50.0, 51.0, 51.0]) == 1e-4
    assert best_lr([0.0, 1e-4, 1e-3], [None, 20.0, None]) == 1e-4          # None: diverged, never chosen


def _rows(label, dataset, accuracies, sizes=None):
    rows = []
    for i, acc in enumerate(accuracies):
        ways, support, query = sizes[i] if sizes else (5, 10, 25)
        rows.append({
            "label": label, "model_id": f"{label}-0", "method": "pmf", "mls": False, "meta": False, "dt": False,
            "ie": False, "tau": None, "experts": None, "dataset": dataset, "finetune": "none", "episode": i,
            "ways": ways, "support_size": support, "query_size": query, "accuracy": acc, "loss": 1.0, "lr": 0.0,
            "seconds": 0.1, "alpha": None, "config_hash": "abc", "smat_version": "0.1.0",
        })
    return rows


def test_write_and_read_results_round_trip(tmp_path):
    out = tmp_path / "eval" / "pmf.csv"
    summary = write_results(_rows("PMF", "textures", [60.0, 70.0, 80.0]), out, extra={"provenance": {"x": 1}})
    header = out.read_text().splitlines()[0]
    assert header == ",".join(EVAL_COLUMNS)
    rows = read_results(out)
    assert [r["accuracy"] for r in rows] == [60.0, 70.0, 80.0]
    assert rows[0]["mls"] == "false" and rows[0]["tau"] == "" and rows[0]["alpha"] == ""
    assert summary["mean"] == pytest.approx(70.0) and summary["n"] == 3
    assert summary_path(out).is_file() and summary["provenance"] == {"x": 1}


def test_concurrent_writers_leave_a_matching_pair_and_a_mismatch_is_detected(tmp_path):
    out = tmp_path / "eval" / "same.csv"
    runs = [_rows(label, "textures", [float(i), 50.0]) for i, label in enumerate(["A", "B"] * 8)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda rows: write_results(rows, out, extra={}), runs))
    summary = read_summary(out)
    assert summary["csv_sha256"] == sha256_file(out)
    assert [r["label"] for r in read_results(out)] == [summary["label"]] * 2
    write_results(_rows("C", "textures", [1.0, 2.0]), tmp_path / "other.csv", extra={})
    shutil.copy(tmp_path / "other.csv", out)                 # a CSV without its own summary
    with pytest.raises(SmatError, match="summarises another version of"):
        read_summary(out)


def test_compare_files_pairs_shared_episodes(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_results(_rows("PMF", "textures", [60.0, 70.0, 80.0, 90.0]), a, extra={})
    write_results(_rows("SMAT", "textures", [62.0, 73.0, 81.0]), b, extra={})
    result = compare(a, b)
    assert result["difference"].n == 3                      # episodes 0..2 only
    assert result["difference"].mean == pytest.approx(2.0)  # (2 + 3 + 1) / 3, B minus A
    assert result["difference"].ci95 == pytest.approx(1.96 * 1.0 / math.sqrt(3))
    text = compare_files(a, b)
    assert "B minus A: +2.00 ± 1.13" in text and "PMF" in text and "SMAT" in text


def test_compare_rejects_mismatched_files(tmp_path):
    a, b, c, d = (tmp_path / f"{n}.csv" for n in "abcd")
    write_results(_rows("PMF", "textures", [60.0, 70.0]), a, extra={})
    write_results(_rows("SMAT", "signs", [60.0, 70.0]), b, extra={})
    with pytest.raises(SmatError, match="dataset"):
        compare(a, b)
    write_results(_rows("SMAT", "textures", [60.0, 70.0], sizes=[(5, 10, 25), (6, 12, 30)]), c, extra={})
    with pytest.raises(SmatError, match="episode 1 has ways"):
        compare(a, c)
    rows = _rows("SMAT", "textures", [60.0])
    rows[0]["episode"] = 7
    write_results(rows, d, extra={})
    with pytest.raises(SmatError, match="share no episode"):
        compare(a, d)
    # Summaries that record different episode files are refused.
    e, f = tmp_path / "e.csv", tmp_path / "f.csv"
    write_results(_rows("PMF", "textures", [60.0, 70.0]), e, extra={"provenance": {"episodes_sha256": "1" * 64}})
    write_results(_rows("SMAT", "textures", [61.0, 72.0]), f, extra={"provenance": {"episodes_sha256": "2" * 64}})
    with pytest.raises(SmatError, match="different episode files"):
        compare(e, f)
    bad = tmp_path / "bad.csv"
    bad.write_text("episode,accuracy\n0,50\n")
    with pytest.raises(SmatError, match="missing column"):
        compare(bad, a)
