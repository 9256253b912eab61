"""Result tables: Table 1 (accuracy per dataset), Table 2 (ablations) and the paper's published numbers.

Each table is written as a tidy CSV (machine readable), Markdown, a LaTeX booktabs `tabular` and an HTML page
(what the Snakemake report shows), plus a `<name>.provenance.json` naming the inputs; all files of one table
appear together or not at all.

Choices (METHOD §3.4, §6):
* cell = mean ± 95% CI over the episodes of one CSV, CI = 1.96·std/√n (unbiased std); one episode has no
  CI and its mean is shown without "±";
* the footer gives the number of test episodes behind each column (per dataset where they differ), as the
  modes with fine-tuning may be evaluated on fewer episodes than those without;
* ID Avg / OOD Avg = mean of the per-dataset means; its CI is the propagated one, √(Σ CI_d²)/k, which
  treats the k datasets as fixed and their episodes as independent. An average is left empty when the column
  lacks one of the block's datasets (a partial average would not be comparable with the others);
* "best" is marked per row separately among the columns without fine-tuning and those with fine-tuning
  (the paper's two column groups), by the value shown (2 decimals), so ties are all marked;
* every dataset named in --id-datasets / --ood-datasets must have results (else SmatError); datasets found
  in the CSVs but not named are left out with a warning.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from smat.analysis import published
from smat.analysis.eval_results import check_datasets, read_eval_csvs, summarise
from smat.methods.registry import SWITCH_LABELS, SWITCH_NAMES, column_rank
from smat.analysis.render import Cell, format_mean_ci, latex, markdown
from smat.evaluation.stats import propagated_ci
from smat.evaluation.modes import FINETUNE_MODES, NO_FINETUNING
from smat.io import SmatError, atomic_path, provenance, sha256_file



def make_table(table: str, eval_paths: Sequence[Path], id_datasets: Sequence[str],
               ood_datasets: Sequence[str], out_dir: Path) -> None:
    """Build `table` ("table1", "table2" or "reference") and write it to `out_dir`."""
    out_dir = Path(out_dir)
    if table == "reference":
        files = reference_files()
        name, inputs = "table_reference", []
    elif table in ("table1", "table2"):
        results = read_eval_csvs(eval_paths)
        files = table1_files(results, id_datasets, ood_datasets) if table == "table1" else \
            table2_files(results, id_datasets, ood_datasets)
        name, inputs = table, [{"path": str(p), "sha256": sha256_file(p)} for p in eval_paths]
    elif table == "anatomy":
        from smat.analysis.anatomy import markdown_table, read_tables

        anatomy = read_tables(eval_paths)
        files = {"csv": anatomy.to_csv(index=False, float_format="%.6g"), "md": markdown_table(anatomy)}
        name, inputs = table, [{"path": str(p), "sha256": sha256_file(p)} for p in eval_paths]
    else:
        raise SmatError(f"unknown table {table!r}; choose table1, table2, reference or anatomy")
    record = provenance(table=table, inputs=inputs, id_datasets=list(id_datasets),
                        ood_datasets=list(ood_datasets))
    files["provenance.json"] = json.dumps(record, indent=2) + "\n"
    _write_together({out_dir / f"{name}.{suffix}": content for suffix, content in files.items()})


def _write_together(files: dict[Path, str | pd.DataFrame]) -> None:
    """Write every file to a temporary path first; rename them all only when all were written."""
    with contextlib.ExitStack() as stack:
        for path, content in files.items():
            tmp = stack.enter_context(atomic_path(path))
            if isinstance(content, pd.DataFrame):
                content.to_csv(tmp, index=False)
            else:
                tmp.write_text(content, encoding="utf-8")


# --------------------------------------------------------------------------------------------- Table 1

@dataclass(frozen=True)
class Column:
    label: str
    finetune: str
    method: str

    @property
    def name(self) -> str:
        return self.label + FINETUNE_MODES[self.finetune].suffix


def label_methods(results: pd.DataFrame) -> dict[str, str]:
    """The method behind each label; one label naming two methods is an input error."""
    methods = results.groupby("label")["method"].unique()
    for label, names in methods.items():
        if len(names) != 1:
            raise SmatError(f"label {label!r} is used for methods {', '.join(map(str, names))}; "
                            f"give each model its own --label")
    return {label: str(names[0]) for label, names in methods.items()}


def table1_columns(results: pd.DataFrame) -> list[Column]:
    """No fine-tuning first, then full, then LoRA; within each, Pre, PMF, SoftMerge, SMAT, others by label."""
    methods = label_methods(results)
    pairs = results[["label", "finetune"]].drop_duplicates().itertuples(index=False)
    columns = [Column(label, finetune, methods[label]) for label, finetune in pairs]
    return sorted(columns, key=lambda c: (list(FINETUNE_MODES).index(c.finetune), column_rank(c.method),
                                          c.label))


def build_table1(results: pd.DataFrame, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> pd.DataFrame:
    """Tidy Table 1: one row per (table row, column) with mean, ci95, n (episodes), n_datasets and best."""
    check_datasets(results, id_datasets, ood_datasets, "table1")
    results = results[results["dataset"].isin([*id_datasets, *ood_datasets])]
    columns = table1_columns(results)
    summary = summarise(results).set_index(["label", "finetune", "dataset"])
    records = []
    for block, datasets in (("ID", id_datasets), ("OOD", ood_datasets)):
        if not datasets:
            continue
        cells = {c.name: [_dataset_cell(summary, d, block, c) for d in datasets] for c in columns}
        for index, dataset in enumerate(datasets):
            records += [cells[c.name][index] for c in columns]
        records += [_average_cell(cells[c.name], block, c) for c in columns]
    tidy = pd.DataFrame(records)
    shown = tidy["mean"].round(2)
    group_best = shown.groupby([tidy["row"], tidy["finetune"].ne(NO_FINETUNING)]).transform("max")
    tidy["best"] = shown.notna() & (shown == group_best)
    return tidy


def _record(row: str, block: str, kind: str, column: Column, mean: float, ci95: float, n: int,
            n_datasets: int) -> dict:
    return {"row": row, "block": block, "kind": kind, "column": column.name, "label": column.label,
            "finetune": column.finetune, "method": column.method, "mean": mean, "ci95": ci95, "n": n,
            "n_datasets": n_datasets}


def _dataset_cell(summary: pd.DataFrame, dataset: str, block: str, column: Column) -> dict:
    key = (column.label, column.finetune, dataset)
    if key not in summary.index:
        return _record(dataset, block, "dataset", column, math.nan, math.nan, n=0, n_datasets=0)
    found = summary.loc[key]
    return _record(dataset, block, "dataset", column, found["mean"], found["ci95"], int(found["n"]), 1)


def _average_cell(cells: list[dict], block: str, column: Column) -> dict:
    """Mean of the per-dataset means, CI √(Σ CI²)/k; empty unless every dataset of the block has results."""
    if any(c["n"] == 0 for c in cells):
        return _record(f"{block} Avg", block, "average", column, math.nan, math.nan, n=0, n_datasets=0)
    k = len(cells)
    return _record(f"{block} Avg", block, "average", column, mean=sum(c["mean"] for c in cells) / k,
                   ci95=propagated_ci([c["ci95"] for c in cells]), n=sum(c["n"] for c in cells),
                   n_datasets=k)


def table1_files(results: pd.DataFrame, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> dict:
    tidy = build_table1(results, id_datasets, ood_datasets)
    names = list(dict.fromkeys(tidy["column"]))
    header = ["Dataset", *names]
    rows, kinds = [], []
    for row, cells in tidy.groupby("row", sort=False):
        kinds.append(cells["kind"].iloc[0])
        rows.append([Cell(row, bold=kinds[-1] == "average")] +
                    [Cell(format_mean_ci(c.mean, c.ci95), bold=bool(c.best)) for c in cells.itertuples()])
    # Rules around each average row, as in the paper.
    rules_after = {i for i, kind in enumerate(kinds)
                   if kind == "average" or (i + 1 < len(kinds) and kinds[i + 1] == "average")}
    n_plain = sum(not n.endswith(("+full", "+LoRA")) for n in names)
    groups = [(title, width) for title, width in (("w/o fine-tuning", n_plain),
                                                  ("with fine-tuning", len(names) - n_plain)) if width]
    note = f"{table1_note(tidy)} {episodes_note(tidy)}"
    return {
        "csv": tidy,
        "md": markdown(header, rows, notes=[note]),
        "tex": latex(header, rows, align="l" + "c" * len(names), groups=groups, rules_after=rules_after,
                     comments=[note]),
        "html": html_page("Table 1: few-shot accuracy per test dataset",
                          [HtmlTable(header, rows, groups=groups, rules_after=rules_after)], notes=[note]),
    }


def table1_note(tidy: pd.DataFrame) -> str:
    """What a cell is; "±" only where some cell has a CI (a dataset with one episode has none)."""
    cells = tidy[(tidy["kind"] == "dataset") & (tidy["n"] > 0)]
    with_ci = cells["ci95"].notna()
    if not with_ci.any():
        what = "Accuracy (%), mean over the test episodes (no CI: one episode per dataset)"
    elif with_ci.all():
        what = "Accuracy (%), mean ± 95% CI over the test episodes"
    else:
        what = ("Accuracy (%), mean ± 95% CI over the test episodes; a mean without ± is over one episode "
                "(no CI)")
    return (f"{what}; averages are means of the per-dataset means, with propagated CI; bold = best per row "
            "among columns without / with fine-tuning.")


def episodes_note(tidy: pd.DataFrame, column: str = "column") -> str:
    """The number of test episodes behind each column's cells: one number per column when all its datasets
    have the same, else one per dataset; columns with the same counts are named together."""
    cells = tidy[(tidy["kind"] == "dataset") & (tidy["n"] > 0)] if "kind" in tidy else tidy[tidy["n"] > 0]
    groups: dict[str, list[str]] = {}
    for name, rows in cells.groupby(column, sort=False):
        counts = rows["n"].astype(int)
        text = str(counts.iloc[0]) if counts.nunique() == 1 else \
            ", ".join(f"{d} {n}" for d, n in zip(rows["row"], counts))
        groups.setdefault(text, []).append(str(name))
    return "Test episodes per dataset: " + "; ".join(f"{', '.join(names)}: {text}"
                                                      for text, names in groups.items()) + "."


# --------------------------------------------------------------------------------------------- Table 2

def build_table2(results: pd.DataFrame, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> pd.DataFrame:
    """One row per label (no fine-tuning): switches, ID, OOD and AVG = mean over all listed datasets (METHOD §6)."""
    plain = results[results["finetune"] == NO_FINETUNING]
    if plain.empty:
        raise SmatError("table2: no rows with finetune 'none' in the given CSVs; Table 2 compares models "
                        "without fine-tuning")
    check_datasets(plain, id_datasets, ood_datasets, "table2")
    plain = plain[plain["dataset"].isin([*id_datasets, *ood_datasets])]
    methods = label_methods(plain)
    means = summarise(plain, by=("label", "dataset")).set_index(["label", "dataset"])["mean"]
    records = []
    for label, rows in plain.groupby("label", sort=False):
        switches = rows[list(SWITCH_NAMES)].drop_duplicates()
        if len(switches) != 1:
            raise SmatError(f"table2: label {label!r} has different {'/'.join(SWITCH_NAMES)} switches in "
                            f"{', '.join(rows['source'].unique())}; one label must be one ablation setting")
        record = {"label": label, "method": methods[label], **switches.iloc[0].to_dict()}
        for column, datasets in (("id", id_datasets), ("ood", ood_datasets),
                                 ("avg", [*id_datasets, *ood_datasets])):
            values = [means.get((label, d), math.nan) for d in datasets]
            record[column] = float(np.mean(values)) if datasets and not np.isnan(values).any() else math.nan
        records.append(record)
    tidy = pd.DataFrame(records)
    tidy["n_id_datasets"], tidy["n_ood_datasets"] = len(id_datasets), len(ood_datasets)
    return tidy.sort_values("label", key=lambda labels: labels.map(_table2_rank(tidy)), kind="stable") \
        .reset_index(drop=True)


def _table2_rank(tidy: pd.DataFrame) -> dict[str, tuple]:
    """The paper's order: full SMAT (all switches on) first, PMF last, the ablations by label between."""
    ranks = {}
    for row in tidy.itertuples():
        switches = [getattr(row, s) for s in SWITCH_NAMES]
        ranks[row.label] = (0 if all(switches) else 2 if not any(switches) else 1, row.label)
    return ranks


def table2_files(results: pd.DataFrame, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> dict:
    tidy = build_table2(results, id_datasets, ood_datasets)
    header = ["Model", *SWITCH_LABELS.values(), "ID", "OOD", "AVG"]
    rows = [[Cell(r["label"]), *[Cell("✓" if r[s] else "✗") for s in SWITCH_NAMES],
             *[Cell(format_mean_ci(r[c], math.nan)) for c in ("id", "ood", "avg")]]
            for r in tidy.to_dict("records")]
    plain = results[(results["finetune"] == NO_FINETUNING) & results["dataset"].isin([*id_datasets, *ood_datasets])]
    counts = summarise(plain, by=("label", "dataset")).rename(columns={"dataset": "row"})
    order = {name: i for i, name in enumerate([*tidy["label"], *id_datasets, *ood_datasets])}
    counts = counts.sort_values(["label", "row"], key=lambda names: names.map(order))
    note = (f"Accuracy (%) without fine-tuning, means of the per-dataset mean accuracies (no CI shown): ID = "
            f"mean over {len(id_datasets)} ID datasets, OOD = mean over {len(ood_datasets)} OOD datasets, AVG = "
            f"mean over all {len(id_datasets) + len(ood_datasets)}. {episodes_note(counts, column='label')}")
    return {"csv": tidy, "md": markdown(header, rows, notes=[note]),
            "tex": latex(header, rows, align="l" + "c" * 7, comments=[note]),
            "html": html_page("Table 2: ablation of the SMAT components", [HtmlTable(header, rows)], notes=[note])}


# ------------------------------------------------------------------------------------- reference table

def reference_inconsistencies(tolerance: float = 0.05) -> list[str]:
    """Printed averages of METHOD §6 that do not follow from the printed entries (beyond rounding)."""
    notes = []
    for block, entries, printed in (("ID", published.TABLE1_ID, published.TABLE1_ID_AVG),
                                    ("OOD", published.TABLE1_OOD, published.TABLE1_OOD_AVG)):
        recomputed = np.mean(list(entries.values()), axis=0)
        for name, shown, actual in zip(published.TABLE1_COLUMNS, printed, recomputed):
            if abs(shown - actual) > tolerance:
                notes.append(f"Table 1, {name}, {block} Avg: printed {shown:.2f}, but the mean of the printed "
                             f"entries is {actual:.2f}.")
    n_id, n_ood = len(published.TABLE1_ID), len(published.TABLE1_OOD)
    for index, (_, *_switches, id_acc, ood_acc, avg) in enumerate(published.TABLE2, start=1):
        actual = (n_id * id_acc + n_ood * ood_acc) / (n_id + n_ood)
        if abs(avg - actual) > tolerance:
            notes.append(f"Table 2, row {index}: printed AVG {avg:.2f}, but ({n_id}·ID + {n_ood}·OOD)/"
                         f"{n_id + n_ood} = {actual:.2f}.")
    for model, column in (("SMAT", "SMAT"), ("PMF", "†PMF")):
        row = next(r for r in published.TABLE2 if r[0] == model)
        index = published.TABLE1_COLUMNS.index(column)
        for block, in_table2, in_table1 in (("ID", row[5], published.TABLE1_ID_AVG[index]),
                                            ("OOD", row[6], published.TABLE1_OOD_AVG[index])):
            if in_table2 != in_table1:
                notes.append(f"{model} {block} is {in_table2:.2f} in Table 2 but {in_table1:.2f} in Table 1.")
    return notes


def build_reference() -> pd.DataFrame:
    """Tidy published numbers: table, row, column, value (ticks as 1/0), recomputed (averages only)."""
    records = []
    for block, entries, printed in (("ID", published.TABLE1_ID, published.TABLE1_ID_AVG),
                                    ("OOD", published.TABLE1_OOD, published.TABLE1_OOD_AVG)):
        for dataset, values in entries.items():
            records += [{"table": "table1", "row": dataset, "column": c, "value": v, "recomputed": math.nan}
                        for c, v in zip(published.TABLE1_COLUMNS, values)]
        recomputed = np.mean(list(entries.values()), axis=0)
        records += [{"table": "table1", "row": f"{block} Avg", "column": c, "value": v, "recomputed": round(r, 4)}
                    for c, v, r in zip(published.TABLE1_COLUMNS, printed, recomputed)]
    n_id, n_ood = len(published.TABLE1_ID), len(published.TABLE1_OOD)
    for index, (model, *switches, id_acc, ood_acc, avg) in enumerate(published.TABLE2, start=1):
        row = f"{index} {model}".strip()
        records += [{"table": "table2", "row": row, "column": s, "value": float(v), "recomputed": math.nan}
                    for s, v in zip(SWITCH_LABELS.values(), switches)]
        records += [{"table": "table2", "row": row, "column": "ID", "value": id_acc, "recomputed": math.nan},
                    {"table": "table2", "row": row, "column": "OOD", "value": ood_acc, "recomputed": math.nan},
                    {"table": "table2", "row": row, "column": "AVG", "value": avg,
                     "recomputed": round((n_id * id_acc + n_ood * ood_acc) / (n_id + n_ood), 4)}]
    return pd.DataFrame(records)


def reference_files() -> dict:
    columns = list(published.TABLE1_COLUMNS)
    rows1, rules_after = [], set()
    for block, entries, printed in (("ID", published.TABLE1_ID, published.TABLE1_ID_AVG),
                                    ("OOD", published.TABLE1_OOD, published.TABLE1_OOD_AVG)):
        rows1 += [[Cell(dataset), *[Cell(f"{v:.2f}") for v in values]] for dataset, values in entries.items()]
        rules_after.add(len(rows1) - 1)
        rows1.append([Cell(f"{block} Avg", bold=True), *[Cell(f"{v:.2f}") for v in printed]])
        rules_after.add(len(rows1) - 1)
    header2 = ["#", "Model", *SWITCH_LABELS.values(), "ID", "OOD", "AVG"]
    rows2 = []
    for index, (model, *switches, id_acc, ood_acc, avg) in enumerate(published.TABLE2, start=1):
        rows2.append([Cell(str(index)), Cell(model), *[Cell("✓" if s else "✗") for s in switches],
                      *[Cell(f"{v:.2f}") for v in (id_acc, ood_acc, avg)]])
    source = ("Published numbers of Chen et al. (ICML 2024), DINO ViT-S/16, accuracy (%); not our results. "
              "† published in Hu et al. 2022, ‡ published in Basu et al. 2023.")
    notes = [f"Note: {n}" for n in reference_inconsistencies()]
    groups = [("w/o fine-tuning", published.TABLE1_N_WITHOUT_FINETUNING),
              ("with fine-tuning", len(columns) - published.TABLE1_N_WITHOUT_FINETUNING)]
    md = ("## Table 1 (published)\n\n" + markdown(["Dataset", *columns], rows1) +
          "\n## Table 2 (published)\n\n" + markdown(header2, rows2) + "\n" + source + "\n\n" +
          "\n".join(f"* {n}" for n in notes) + "\n")
    tex = (latex(["Dataset", *columns], rows1, align="l" + "c" * len(columns), groups=groups,
                 rules_after=rules_after) + "\n\\bigskip\n\n" +
           latex(header2, rows2, align="cl" + "c" * 7, notes=[source, *notes]))
    page = html_page("The paper's published numbers",
                     [HtmlTable(["Dataset", *columns], rows1, groups=groups, rules_after=rules_after,
                                title="Table 1 (published)"),
                      HtmlTable(header2, rows2, title="Table 2 (published)")], notes=[source, *notes])
    return {"csv": build_reference(), "md": md, "tex": tex, "html": page}


# ------------------------------------------------------------------------------------ HTML (the report)

@dataclass(frozen=True)
class HtmlTable:
    header: list[str]
    rows: list[list[Cell]]
    groups: list[tuple[str, int]] = ()      # (title, number of columns) over the header, after the first column
    rules_after: set[int] = frozenset()     # body rows followed by a rule
    title: str = ""


_CSS = ("body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{padding:3px 9px;text-align:center;white-space:nowrap}td:first-child{text-align:left}"
        "thead tr:last-child th{border-bottom:1px solid #333}table{border-top:2px solid #333;"
        "border-bottom:2px solid #333}tr.rule td{border-bottom:1px solid #999}p{max-width:60em}")


def html_page(title: str, tables: list[HtmlTable], notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page of the tables, with the same cells as Markdown and LaTeX: what the Snakemake
    report shows for a table."""
    out = [f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
           f"<style>{_CSS}</style></head><body>"]
    for table in tables:
        if table.title:
            out.append(f"<h3>{html.escape(table.title)}</h3>")
        out.append("<table><thead>")
        if table.groups:
            out.append("<tr><th></th>" + "".join(f'<th colspan="{width}">{html.escape(name)}</th>'
                                                 for name, width in table.groups) + "</tr>")
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.header) + "</tr></thead><tbody>")
        for index, row in enumerate(table.rows):
            cells = "".join(f"<td><b>{html.escape(c.text)}</b></td>" if c.bold and c.text else
                            f"<td>{html.escape(c.text)}</td>" for c in row)
            out.append(f'<tr class="rule">{cells}</tr>' if index in table.rules_after else f"<tr>{cells}</tr>")
        out.append("</tbody></table>")
    out += [f"<p>{html.escape(note)}</p>" for note in notes]
    return "\n".join(out) + "\n</body></html>\n"
