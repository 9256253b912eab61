"""The paper's findings, checked on a finished run of the default workflow (README, "What the default
numbers show").

Every finding is a mean over datasets of per-dataset paired differences (the same frozen test episodes
for every model), with a 95% CI propagated over the independent datasets: sqrt(sum of CI²) / k.

    python benchmarks/findings.py [--run DIR] [--config FILE]          # DIR holds results/ (default: .)
    python benchmarks/findings.py --run DIR --record [--label NAME]     # also record them

Prints the findings; with --record also merges them into benchmarks/results/findings.json (or the file
given to --record) under --label, so that checking a number leaves the checkout as it was. With several
training seeds in the run (`training.seeds`), every seed is checked on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from smat.evaluation.stats import paired_difference, propagated_ci
from smat.io import provenance, read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "findings.json"
PAPER = {"PMF - Pre, ID": 12.94, "SMAT - PMF, OOD": 3.17, "SMAT - PMF, ID": 0.91, "SMAT - SoftMerge, OOD": 2.40,
         "row 1 - row 4, AVG": 3.26, "OOD, tau max - tau min": None}


def accuracies(run: Path, model_id: str, dataset: str) -> list[float]:
    return pd.read_csv(run / "results" / "eval" / model_id / dataset / "none.csv")["accuracy"].tolist()


def mean_paired(run: Path, a: str, b: str, datasets: list[str]) -> dict[str, float]:
    """b − a: the mean over datasets of the paired per-dataset differences, with its 95% CI."""
    per = [paired_difference(accuracies(run, a, d), accuracies(run, b, d)) for d in datasets]
    return {"mean": round(sum(s.mean for s in per) / len(per), 2),
            "ci95": round(propagated_ci([s.ci95 for s in per]), 2),
            "per_dataset": {d: round(s.mean, 2) for d, s in zip(datasets, per)}}


def mean_accuracy(run: Path, model_id: str, datasets: list[str]) -> float:
    return round(sum(pd.Series(accuracies(run, model_id, d)).mean() for d in datasets) / len(datasets), 2)


# Tolerances of the checks (the default-run issue's acceptance): the τ sweep may move the wrong way by this much
# per step, and every expert's final train-mode sparsity must lie this close to τ.
SWEEP_TOLERANCE = 0.5
SPARSITY_TOLERANCE = 0.03
LAMBDA_ACTIVE = 0.25


def gate_dynamics(run: Path, model_id: str, tau: float) -> dict:
    """From a SMAT model's train_log.jsonl: final realised sparsity per expert, its largest distance from τ,
    and the share of meta-updates with some λ > 0 (METHOD §1.13)."""
    records = [r for r in map(json.loads, (run / "results" / "models" / model_id / "train_log.jsonl").open())
               if r["kind"] == "train" and r.get("sparsity")]
    final = records[-1]["sparsity"]
    return {"tau": tau, "final_sparsity": [round(v, 4) for v in final],
            "max_distance": round(max(abs(v - tau) for v in final), 4),
            "lambda_active": round(sum(any(v > 0 for v in r["lambda"]) for r in records) / len(records), 3)}


def findings(run: Path, config: dict, seed: int) -> dict:
    roles = {name: d["role"] for name, d in config["datasets"].items()}
    ids = [n for n, r in roles.items() if r == "id"]
    oods = [n for n, r in roles.items() if r == "ood"]
    main = config["models"]["smat"]
    smat = f"smat/tau~{main['tau']}/experts~{main['experts']}/seed~{seed}"
    pmf, row4 = f"pmf/seed~{seed}", f"ablation/row~4/seed~{seed}"
    softmerge = f"softmerge/experts~{config['models']['softmerge']['experts']}/seed~{seed}"
    result = {
        "PMF - Pre, ID": mean_paired(run, "pre", pmf, ids),
        "SMAT - PMF, OOD": mean_paired(run, pmf, smat, oods),
        "SMAT - PMF, ID": mean_paired(run, pmf, smat, ids),
    }
    if (run / "results" / "eval" / softmerge).is_dir():
        result["SMAT - SoftMerge, OOD"] = mean_paired(run, softmerge, smat, oods)
    if (run / "results" / "eval" / row4).is_dir():
        result["row 1 - row 4, AVG"] = mean_paired(run, row4, smat, ids + oods)
    taus = sorted({main["tau"], *config["models"]["sweep"]["tau"]})
    sweep, gates = {}, {}
    for tau in taus:
        model = f"smat/tau~{tau}/experts~{main['experts']}/seed~{seed}"
        if (run / "results" / "eval" / model).is_dir():
            sweep[tau] = {"id": mean_accuracy(run, model, ids), "ood": mean_accuracy(run, model, oods)}
        if (run / "results" / "models" / model / "train_log.jsonl").is_file():
            gates[tau] = gate_dynamics(run, model, tau)
    result["tau sweep"] = sweep
    result["gates"] = gates
    if len(sweep) >= 3:
        low, high = min(sweep), max(sweep)
        result["OOD, tau max - tau min"] = mean_paired(run, f"smat/tau~{low}/experts~{main['experts']}/seed~{seed}",
                                                       f"smat/tau~{high}/experts~{main['experts']}/seed~{seed}",
                                                       oods)
    checks = {
        "PMF - Pre, ID: CI above 0": result["PMF - Pre, ID"]["mean"] - result["PMF - Pre, ID"]["ci95"] > 0,
        "SMAT - PMF, OOD: CI above 0": result["SMAT - PMF, OOD"]["mean"] - result["SMAT - PMF, OOD"]["ci95"] > 0,
        "SMAT - PMF, ID >= -1": result["SMAT - PMF, ID"]["mean"] >= -1.0,
    }
    if "SMAT - SoftMerge, OOD" in result:
        checks["SMAT - SoftMerge, OOD >= 0"] = result["SMAT - SoftMerge, OOD"]["mean"] >= 0
    if "row 1 - row 4, AVG" in result:
        checks["row 1 - row 4, AVG > 0"] = result["row 1 - row 4, AVG"]["mean"] > 0
    if len(sweep) >= 3:
        values = [sweep[t] for t in sorted(sweep)]
        checks["tau up: OOD does not fall (0.5 per step)"] = all(
            b["ood"] >= a["ood"] - SWEEP_TOLERANCE for a, b in zip(values, values[1:]))
        checks["tau up: ID does not rise (0.5 per step)"] = all(
            b["id"] <= a["id"] + SWEEP_TOLERANCE for a, b in zip(values, values[1:]))
        span = result["OOD, tau max - tau min"]
        checks["OOD, tau max - tau min: CI above 0"] = span["mean"] - span["ci95"] > 0
    if gates:
        checks[f"sparsity ends within {SPARSITY_TOLERANCE} of tau (every expert, every tau)"] = all(
            g["max_distance"] <= SPARSITY_TOLERANCE for g in gates.values())
        checks[f"lambda > 0 in at least {LAMBDA_ACTIVE:.0%} of the updates"] = all(
            g["lambda_active"] >= LAMBDA_ACTIVE for g in gates.values())
    result["holds"] = checks
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("."), help="directory holding results/ of the run")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml",
                        help="the run's workflow config")
    parser.add_argument("--record", type=Path, nargs="?", const=RESULTS, default=None, metavar="FILE",
                        help=f"also merge the findings into FILE (default: {RESULTS.relative_to(ROOT)}, tracked)")
    parser.add_argument("--label", default="default", help="key of the findings in the --record file")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    recorded = {}
    for seed in config["training"]["seeds"]:
        result = findings(args.run, config, seed)
        recorded[f"seed {seed}"] = result
        print(f"\nseed {seed}")
        for name, value in result.items():
            if isinstance(value, dict) and "mean" in value:
                paper = "rises" if PAPER[name] is None else f"{PAPER[name]:+.2f}"
                print(f"  {name:<24}{value['mean']:+7.2f} ± {value['ci95']:.2f}   (paper {paper})   "
                      + "  ".join(f"{d} {v:+.1f}" for d, v in value["per_dataset"].items()))
        for tau, point in result["tau sweep"].items():
            print(f"  tau {tau:<5} mean ID {point['id']:.2f}  mean OOD {point['ood']:.2f}")
        for tau, gate in result["gates"].items():
            print(f"  tau {tau:<5} final sparsity {min(gate['final_sparsity']):.3f}-{max(gate['final_sparsity']):.3f}"
                  f"  (max |s - tau| {gate['max_distance']:.3f})  lambda > 0 in {gate['lambda_active']:.0%} of updates")
        for check, holds in result["holds"].items():
            print(f"  {'holds ' if holds else 'FAILS '} {check}")
    if args.record:
        results = read_json(args.record) if args.record.is_file() else {}
        results[args.label] = {"seeds": recorded, "paper": PAPER, "provenance": provenance()}
        write_json(args.record, results)
        print(f"\nrecorded in {args.record} under {args.label!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
