"""Meta-training on the embedded benchmark: time per model, sparsity convergence, query-loss drop (issue 4).

Trains one model with `smat train` (default: SMAT with config/training/embedded.yaml) on the given ID stores
and summarises its training log: wall and CPU time, the first task after which every expert's realised
sparsity stays within ±0.05 of τ, the query cross-entropy of the first and last meta-updates (means over
the first and last 5), and the validation accuracy per epoch.

    python benchmarks/bench_embedded_train.py --store STORE... --pretrained FILE [--set KEY=VALUE ...]
        [--work DIR] [--out benchmarks/results/embedded_train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from smat.io import provenance, write_json

REPO = Path(__file__).resolve().parents[1]


def summarise(run: Path, tau: float, band: float = 0.05) -> dict:
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    within = [all(abs(s - tau) <= band for s in r["sparsity"]) if r["sparsity"] else False for r in train]
    settled = next((train[i]["task"] for i in range(len(train)) if all(within[i:])), None)
    first_within = next((r["task"] for r, ok in zip(train, within) if ok), None)
    return {
        "tasks": train[-1]["task"],
        "first_task_all_experts_within_band": first_within,
        "task_after_which_all_experts_stay_within_band": settled,
        "final_sparsity": train[-1]["sparsity"],
        "query_ce_first_5_updates": float(np.mean([r["ce"] for r in train[:5]])),
        "query_ce_last_5_updates": float(np.mean([r["ce"] for r in train[-5:]])),
        "val_acc_per_epoch": [r["acc"] for r in records if r["kind"] == "val"],
        "grad_alignment": [{k: r[k] for k in ("task", "group", "mean_cos")} for r in records
                           if r["kind"] == "grad_alignment"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", nargs="+", required=True)
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--config", default=str(REPO / "config" / "training" / "embedded.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the workflow gives a training job 1)")
    parser.add_argument("--work", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "embedded_train.json"))
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="smat-train-"))
    command = [sys.executable, "-m", "smat.cli", "train", "--config", args.config, "--store", *args.store,
               "--pretrained", args.pretrained, "--out", str(work / "run"), "--device", "cpu"]
    for item in args.set:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    config = yaml.safe_load((work / "run" / "config.yaml").read_text())
    summary = {"method": config["method"], "tau": config["tau"], "experts": config["experts"],
               "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
               **summarise(work / "run", config["tau"])}
    for key, value in summary.items():
        print(f"{key}: {value}")
    write_json(args.out, {"settings": {"config": args.config, "set": args.set, "threads": args.threads,
                                       "stores": args.store, "pretrained": args.pretrained},
                          "summary": summary, "provenance": provenance()})
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
