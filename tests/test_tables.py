"""Result tables built from small per-episode CSVs in the format of `smat evaluate`, and the reference table."""

from __future__ import annotations

import html
import json
import math
import re
import statistics

import pandas as pd
import pytest

from smat.analysis.tables import make_table
from smat.cli import main
from smat.evaluation.results import write_results
from smat.io import SmatError

ON, OFF = (True, True, True, True), (False, False, False, False)


def write_eval(path, label, method, accuracies, finetune="none", switches=ON, tau=None, experts=None,
               episodes_sha256=None):
    """An eval CSV written by `smat evaluate`'s writer; `accuracies[dataset]` = per-episode accuracies (%)."""
    rows = [dict(zip(("mls", "meta", "dt", "ie"), switches), label=label, model_id=f"{method}/{label}",
                 method=method, tau=tau, experts=experts, dataset=dataset, finetune=finetune, episode=episode,
                 ways=5, support_size=25, query_size=50, accuracy=accuracy, loss=0.7, lr=0.0, seconds=0.01,
                 alpha=None, config_hash="cafe", smat_version="0.1.0")
            for dataset, values in accuracies.items() for episode, accuracy in enumerate(values)]
    write_results(rows, path, extra={"provenance": {"episodes_sha256": episodes_sha256}} if episodes_sha256 else {})
    return path


def ci95(values):
    return 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def cell(mean, ci):
    return f"{mean:.2f} ± {ci:.2f}"


@pytest.fixture
def table1_inputs(tmp_path):
    """Three methods without fine-tuning, SMAT+full and PMF+LoRA; PMF+LoRA lacks dataset 'b'."""
    a, b, c = [60.0, 70.0, 80.0], [50.0, 52.0, 54.0, 56.0], [90.0, 91.0]
    return [
        write_eval(tmp_path / "smat_full.csv", "SMAT", "smat", {"a": [x + 3 for x in a], "b": b, "c": c},
                   finetune="full", tau=0.9, experts=8),
        write_eval(tmp_path / "smat.csv", "SMAT", "smat", {"a": a, "b": [x + 1 for x in b], "c": c}, tau=0.9,
                   experts=8),
        write_eval(tmp_path / "pmf_lora.csv", "PMF", "pmf", {"a": [x + 5 for x in a], "c": c}, finetune="lora",
                   switches=OFF),
        write_eval(tmp_path / "pre.csv", "Pre", "pre", {"a": a, "b": b, "c": c, "extra": [1.0, 2.0]},
                   switches=(None,) * 4),
        write_eval(tmp_path / "pmf.csv", "PMF", "pmf", {"a": [x - 1 for x in a], "b": b, "c": c}, switches=OFF),
    ]


def test_table1_cells_rows_columns_averages_and_best(tmp_path, table1_inputs):
    out = tmp_path / "tables"
    make_table("table1", table1_inputs, id_datasets=["b", "a"], ood_datasets=["c"], out_dir=out)
    tidy = pd.read_csv(out / "table1.csv")

    assert list(dict.fromkeys(tidy["row"])) == ["b", "a", "ID Avg", "c", "OOD Avg"]       # 'extra' left out
    assert list(dict.fromkeys(tidy["column"])) == ["Pre", "PMF", "SMAT", "SMAT+full", "PMF+LoRA"]
    assert len(tidy) == 5 * 5

    def get(row, column):
        return tidy[(tidy["row"] == row) & (tidy["column"] == column)].iloc[0]

    a = [60.0, 70.0, 80.0]
    assert get("a", "Pre")["mean"] == pytest.approx(70.0)
    assert get("a", "Pre")["ci95"] == pytest.approx(ci95(a))
    assert get("a", "Pre")["n"] == 3
    assert get("b", "SMAT")["mean"] == pytest.approx(54.0)
    # ID Avg = mean of the per-dataset means; its CI is sqrt(sum CI^2) / k.
    b = [50.0, 52.0, 54.0, 56.0]
    avg = get("ID Avg", "PMF")
    assert avg["mean"] == pytest.approx((53.0 + 69.0) / 2)
    assert avg["ci95"] == pytest.approx(math.sqrt(ci95(a) ** 2 + ci95(b) ** 2) / 2)
    assert avg["n"] == 7 and avg["n_datasets"] == 2
    # PMF+LoRA has no 'b': empty cell and no ID average.
    assert get("b", "PMF+LoRA")["n"] == 0 and math.isnan(get("b", "PMF+LoRA")["mean"])
    assert math.isnan(get("ID Avg", "PMF+LoRA")["mean"])
    assert get("OOD Avg", "SMAT")["mean"] == pytest.approx(90.5)
    assert get("OOD Avg", "SMAT")["ci95"] == pytest.approx(ci95([90.0, 91.0]))       # one OOD dataset

    # Best per row, separately without / with fine-tuning; ties (row 'c') are all marked.
    best = {(r.row, r.column) for r in tidy.itertuples() if r.best}
    assert ("b", "SMAT") in best and ("b", "SMAT+full") in best and ("b", "Pre") not in best
    assert ("a", "PMF+LoRA") in best and ("a", "SMAT+full") not in best
    assert {col for row, col in best if row == "c"} == {"Pre", "PMF", "SMAT", "SMAT+full", "PMF+LoRA"}

    md = (out / "table1.md").read_text()
    assert md.splitlines()[0] == "| Dataset | Pre | PMF | SMAT | SMAT+full | PMF+LoRA |"
    ci = ci95(a)
    assert (f"| a | **{cell(70, ci)}** | {cell(69, ci)} | **{cell(70, ci)}** | {cell(73, ci)} | **{cell(75, ci)}** |"
            in md.splitlines())
    assert f"**{cell(54, ci95(b))}**" in md
    b_row = next(line for line in md.splitlines() if line.startswith("| b |"))
    assert b_row.endswith("|  |")                                                          # empty PMF+LoRA cell
    assert "| **ID Avg** |" in md

    tex = (out / "table1.tex").read_text()
    check_booktabs(tex, n_columns=6)
    assert r"\multicolumn{3}{c}{w/o fine-tuning}" in tex and r"\multicolumn{2}{c}{with fine-tuning}" in tex
    assert r"\textbf{54.00 $\pm$ " in tex
    record = json.loads((out / "table1.provenance.json").read_text())
    assert record["smat_version"] and len(record["inputs"]) == 5 and len(record["inputs"][0]["sha256"]) == 64


def check_booktabs(tex: str, n_columns: int) -> None:
    """A booktabs tabular whose every row has `n_columns` cells."""
    lines = tex.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{") and r"\end{tabular}" in lines
    align = re.match(r"\\begin\{tabular\}\{(\w+)\}", lines[0]).group(1)
    assert len(align) == n_columns
    assert lines[1] == r"\toprule" and r"\midrule" in lines and r"\bottomrule" in lines
    assert tex.count("{") == tex.count("}")
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    for line in body:
        if line != r"\midrule":
            assert line.endswith(r"\\") and len(re.findall(r"(?<!\\)&", line)) == n_columns - 1, line


def test_table2_ticks_avg_and_order(tmp_path):
    id_sets, ood_sets = {"a": [80.0, 82.0], "b": [70.0, 70.0]}, {"c": [50.0, 54.0], "d": [40.0, 40.0], "e": [30.0]}
    both = {**id_sets, **ood_sets}
    shift = lambda d, s: {k: [x + s for x in v] for k, v in d.items()}  # noqa: E731
    inputs = [
        write_eval(tmp_path / "pmf.csv", "PMF", "pmf", shift(both, -2), switches=OFF),
        write_eval(tmp_path / "no_dt.csv", "SMAT w/o DT", "smat", shift(both, -1), switches=(True, True, False, True)),
        write_eval(tmp_path / "smat.csv", "SMAT", "smat", both, tau=0.9, experts=8),
        write_eval(tmp_path / "dense.csv", "Dense", "smat", shift(both, 1), switches=(False, True, True, False)),
        write_eval(tmp_path / "smat_full.csv", "SMAT", "smat", shift(both, 10), finetune="full"),   # ignored
    ]
    make_table("table2", inputs, id_datasets=["a", "b"], ood_datasets=["c", "d", "e"], out_dir=tmp_path)
    tidy = pd.read_csv(tmp_path / "table2.csv")
    assert list(tidy["label"]) == ["SMAT", "Dense", "SMAT w/o DT", "PMF"]
    smat = tidy.iloc[0]
    assert smat["id"] == pytest.approx((81 + 70) / 2)
    assert smat["ood"] == pytest.approx((52 + 40 + 30) / 3)
    assert smat["avg"] == pytest.approx((2 * smat["id"] + 3 * smat["ood"]) / 5)
    assert smat["avg"] == pytest.approx((81 + 70 + 52 + 40 + 30) / 5)
    assert tidy.iloc[3]["avg"] == pytest.approx(smat["avg"] - 2)

    md = (tmp_path / "table2.md").read_text().splitlines()
    assert md[0] == "| Model | MLS | Meta | DT | IE | ID | OOD | AVG |"
    assert md[2] == f"| SMAT | ✓ | ✓ | ✓ | ✓ | 75.50 | 40.67 | {smat['avg']:.2f} |"
    assert md[3].startswith("| Dense | ✗ | ✓ | ✓ | ✗ |")
    assert md[4].startswith("| SMAT w/o DT | ✓ | ✓ | ✗ | ✓ |")
    assert md[5].startswith("| PMF | ✗ | ✗ | ✗ | ✗ |")
    tex = (tmp_path / "table2.tex").read_text()
    check_booktabs(tex, n_columns=8)
    assert r"SMAT & \checkmark & \checkmark & \checkmark & \checkmark & 75.50" in tex
    assert r"PMF & $\times$ & $\times$ & $\times$ & $\times$" in tex


def test_table2_rejects_a_label_with_two_switch_settings(tmp_path):
    inputs = [write_eval(tmp_path / "x.csv", "SMAT", "smat", {"a": [1.0, 2.0]}),
              write_eval(tmp_path / "y.csv", "SMAT", "smat", {"b": [1.0, 2.0]}, switches=OFF)]
    with pytest.raises(SmatError, match="'SMAT' has different mls/meta/dt/ie switches"):
        make_table("table2", inputs, id_datasets=["a"], ood_datasets=["b"], out_dir=tmp_path / "out")


def test_reference_table_reproduces_the_published_numbers(tmp_path):
    make_table("reference", [], id_datasets=[], ood_datasets=[], out_dir=tmp_path)
    tidy = pd.read_csv(tmp_path / "table_reference.csv")
    table1, table2 = tidy[tidy["table"] == "table1"], tidy[tidy["table"] == "table2"]
    assert len(table1) == (8 + 1 + 10 + 1) * 11 and len(table2) == 6 * 7

    def value(table, row, column):
        return table[(table["row"] == row) & (table["column"] == column)]["value"].item()

    # Spot checks typed from METHOD §6.
    assert value(table1, "ImageNet", "†Pre") == 73.48
    assert value(table1, "Omniglot", "PMF+LoRA") == 92.78
    assert value(table1, "Cars", "SMAT+LoRA") == 40.05
    assert value(table1, "ID Avg", "SMAT") == 85.14
    assert value(table1, "OOD Avg", "SMAT+full") == 75.31
    assert value(table1, "ID Avg", "SoftMerge+full") == 85.56
    row = table1[(table1["row"] == "ID Avg") & (table1["column"] == "SoftMerge+full")]
    assert row["recomputed"].item() == pytest.approx(85.68, abs=0.005)
    assert value(table2, "1 SMAT", "AVG") == 75.21 and value(table2, "6 PMF", "OOD") == 64.09
    assert value(table2, "5", "MLS") == 0 and value(table2, "5", "Meta") == 1
    assert table2[(table2["row"] == "5") & (table2["column"] == "AVG")]["recomputed"].item() == \
        pytest.approx(74.65, abs=0.005)
    # Every other average agrees with its entries to rounding (METHOD §6 consistency check).
    averages = table1[table1["row"].str.endswith("Avg")]
    off = averages[(averages["value"] - averages["recomputed"]).abs() > 0.011]
    assert list(zip(off["row"], off["column"])) == [("ID Avg", "SoftMerge+full")]

    md = (tmp_path / "table_reference.md").read_text()
    assert "| VGGFlower | 94.45 | 94.12 | 96.89 | 97.19 | 94.20 | 94.12 | 97.01 | 97.19 | 94.80 | 96.05 | 97.25 |" in md
    assert "| 5 |  | ✗ | ✓ | ✓ | ✗ | 85.21 | 66.21 | 74.75 |" in md
    assert "SoftMerge+full, ID Avg: printed 85.56, but the mean of the printed entries is 85.68" in md
    assert "row 5: printed AVG 74.75, but (8·ID + 10·OOD)/18 = 74.65" in md
    assert "PMF OOD is 64.09 in Table 2 but 64.10 in Table 1" in md
    assert "not our results" in md
    tex = (tmp_path / "table_reference.tex").read_text()
    first, second = tex.split(r"\bigskip")
    check_booktabs(first.strip(), n_columns=12)
    check_booktabs(second.strip(), n_columns=9)


@pytest.mark.parametrize("case, message", [
    ("no_inputs", "no eval CSV files given"),
    ("missing_columns", r"bad\.csv: not a `smat evaluate` result file, missing column\(s\) method, accuracy"),
    ("unknown_dataset", "no results for dataset\\(s\\) typo"),
    ("duplicate", "label 'SMAT', dataset 'a', finetune 'none' appears in more than one file"),
    ("no_datasets", "pass the dataset names with --id-datasets"),
    ("other_episodes", r"smat\.csv and .*pmf\.csv come from different episode files for dataset 'a' \(sha256 "
                       r"aaaaaaaaaaaa vs bbbbbbbbbbbb\)"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, case, message):
    good = write_eval(tmp_path / "smat.csv", "SMAT", "smat", {"a": [1.0, 2.0], "b": [3.0, 4.0]},
                      episodes_sha256="a" * 64)
    inputs, id_sets = [good], ["a"]
    if case == "no_inputs":
        inputs = []
    elif case == "missing_columns":
        pd.read_csv(good).drop(columns=["accuracy", "method"]).to_csv(tmp_path / "bad.csv", index=False)
        inputs = [good, tmp_path / "bad.csv"]
    elif case == "unknown_dataset":
        id_sets = ["a", "typo"]
    elif case == "duplicate":
        inputs = [good, write_eval(tmp_path / "again.csv", "SMAT", "smat", {"a": [5.0, 6.0]})]
    elif case == "no_datasets":
        id_sets = []
    elif case == "other_episodes":
        inputs = [good, write_eval(tmp_path / "pmf.csv", "PMF", "pmf", {"a": [5.0, 6.0]}, switches=OFF,
                                   episodes_sha256="b" * 64)]
    out = tmp_path / "out"
    with pytest.raises(SmatError, match=message):
        make_table("table1", inputs, id_datasets=id_sets, ood_datasets=[], out_dir=out)
    assert not out.exists() or not any(out.iterdir())


def test_cli_writes_tables_and_reports_errors(tmp_path, capsys):
    good = write_eval(tmp_path / "smat.csv", "SMAT", "smat", {"a": [1.0, 2.0], "b": [3.0]})
    assert main(["tables", "table1", "--eval", str(good), "--id-datasets", "a", "--ood-datasets", "b",
                 "--out-dir", str(tmp_path / "t")]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "table1.csv", "table1.html", "table1.md", "table1.provenance.json", "table1.tex"]
    md = (tmp_path / "t" / "table1.md").read_text().splitlines()
    assert "| b | **3.00** |" in md and "| **OOD Avg** | **3.00** |" in md          # one episode: no CI
    assert main(["tables", "table1", "--eval", str(tmp_path / "nope.csv"), "--id-datasets", "a",
                 "--out-dir", str(tmp_path / "t")]) == 2
    assert "nope.csv: file not found" in capsys.readouterr().err


def test_table_footers_give_the_episodes_behind_each_column(tmp_path, table1_inputs):
    """Columns of one episode count are named together; a column whose datasets differ lists each."""
    out = tmp_path / "tables"
    make_table("table1", table1_inputs, id_datasets=["b", "a"], ood_datasets=["c"], out_dir=out)
    footer = (out / "table1.md").read_text().strip().splitlines()[-1]
    assert footer.startswith("Accuracy (%), mean ± 95% CI over the test episodes;")
    assert ("Test episodes per dataset: Pre, PMF, SMAT, SMAT+full: b 4, a 3, c 2; PMF+LoRA: a 3, c 2."
            in footer)
    assert footer in (out / "table1.tex").read_text()
    page = (out / "table1.html").read_text()          # the report's rendering: the same cells and footer
    assert '<th colspan="3">w/o fine-tuning</th><th colspan="2">with fine-tuning</th>' in page
    assert "<td><b>ID Avg</b></td>" in page and html.escape(footer) in page

    make_table("table2", table1_inputs, id_datasets=["b", "a"], ood_datasets=["c"], out_dir=out)
    footer = (out / "table2.md").read_text().strip().splitlines()[-1]
    assert "(no CI shown)" in footer and "Test episodes per dataset: SMAT, PMF, Pre: b 4, a 3, c 2." in footer


def test_a_table_of_single_episodes_claims_no_confidence_interval(tmp_path):
    files = [write_eval(tmp_path / "pre.csv", "Pre", "pre", {"a": [60.0], "c": [70.0]}, switches=(None,) * 4),
             write_eval(tmp_path / "pmf.csv", "PMF", "pmf", {"a": [65.0, 75.0], "c": [72.0]}, switches=OFF)]
    make_table("table1", files, id_datasets=["a"], ood_datasets=["c"], out_dir=tmp_path / "one")
    text = (tmp_path / "one" / "table1.md").read_text()
    assert "| a | 60.00 | **70.00 ± 9.80** |" in text      # one episode: a bare mean; two: with its CI
    assert "a mean without ± is over one episode (no CI)" in text
    assert "Test episodes per dataset: Pre: 1; PMF: a 2, c 1." in text

    make_table("table1", files[:1], id_datasets=["a"], ood_datasets=["c"], out_dir=tmp_path / "none")
    text = (tmp_path / "none" / "table1.md").read_text()
    assert "±" not in text and "no CI: one episode per dataset" in text
