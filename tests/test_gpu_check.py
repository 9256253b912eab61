"""benchmarks/gpu_check.py, the one-shot device check, runs end to end on CPU (`--device cpu --tiny`) and writes
one JSON whose every measured figure is a positive finite number."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def figures(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key != "settings"}


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu_writes_one_json_of_positive_figures(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out",
                           str(tmp_path)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check_cpu.json"]
    record = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert {"device", "settings", "meta_update", "evaluation", "failed", "skipped", "data_parallel", "provenance",
            "wall_seconds"} <= record.keys()
    assert record["device"]["type"] == "cpu" and record["device"]["name"] and record["device"]["torch"]
    assert record["failed"] == {}
    expected = {f"{m} {k} {p}" for m in ("smat", "pmf") for k in ("fixed", "variable") for p in ("fp16", "bf16")}
    assert record["meta_update"].keys() == expected
    # compilation is CUDA-only, as in `smat train`; nothing else is skipped on a quick CPU run
    assert record["skipped"].keys() == {f"meta_update {m} {k} fp16+compile" for m in ("smat", "pmf")
                                        for k in ("fixed", "variable")}
    assert record["evaluation"].keys() == {"smat", "pmf"}
    for entry in [*record["meta_update"].values(), *record["evaluation"].values()]:
        assert entry["settings"]["method"] in ("smat", "pmf")
        assert figures(entry), entry
        for key, value in figures(entry).items():
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    for entry in record["meta_update"].values():
        assert figures(entry).keys() == {"tasks_per_s", "seconds_per_update", "warmup_seconds", "peak_memory_mb"}
        assert entry["settings"]["amp"] in ("fp16", "bf16") and entry["settings"]["compile"] is False
    assert record["meta_update"]["smat fixed bf16"]["settings"]["autocast"] == "bfloat16"
    assert record["meta_update"]["smat fixed fp16"]["settings"]["autocast"] == "fp32 (no autocast)"  # CPU
