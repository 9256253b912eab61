"""One-shot device check of meta-training and evaluation speed: run this once when a GPU is lent.

    python benchmarks/gpu_check.py                              # CUDA: ViT-S/16, ≤ 8 min, one JSON
    python benchmarks/gpu_check.py --device cpu --tiny --out DIR # CPU smoke run of the same code (seconds)

Measures, with random weights (speed does not depend on them) and fixed synthetic episodes:
1. meta-updates (what `smat train` does per optimiser step: B tasks of `meta_loss` + backward of loss / B, then
   `smat.training.optim.step`) of SMAT (M = 8) and PMF, ViT-S/16 at 128 px, B = 4 tasks of 5-way 5-shot
   15-query ("fixed") and of Meta-Dataset size ("variable": 25-35 ways, 480-504 images each), each under
   `amp: fp16`, `amp: bf16` and fp16 with `compile: true`: tasks/s and peak memory (CUDA: max allocated;
   CPU: the process's peak RSS so far, which only grows);
2. evaluation episodes/s at 224 px (`EpisodeRunner`, no fine-tuning, fp32 as `smat evaluate`) of SMAT and PMF.
The JSON is rewritten after every measurement, so a run cut short keeps what it measured; a measurement that
fails (e.g. compilation) is recorded with its one-line error and the rest go on; none starts after 420 s.
Compilation runs on CUDA only (`smat train` refuses `compile: true` on CPU). With >= 2 GPUs the data-parallel
equality check is `python -m pytest tests/test_distributed.py` (not run here).
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evaluation import synthetic_store, timed_run  # noqa: E402
from bench_meta_update import episodes  # noqa: E402

from smat.data.episodes import load_episode_file, sample_to_file  # noqa: E402
from smat.data.store import Store  # noqa: E402
from smat.device import (autocast, autocast_dtype, grad_scaler, resolve_device,  # noqa: E402
                         set_matmul_precision)
from smat.evaluation.evaluate import EpisodeRunner  # noqa: E402
from smat.io import SmatError, provenance, write_json  # noqa: E402
from smat.methods.registry import build_model  # noqa: E402
from smat.models.backbones import create_backbone  # noqa: E402
from smat.training.config import TrainConfig  # noqa: E402
from smat.training.optim import build_optimisers, set_epoch_lr, step  # noqa: E402

# (ways, shots, queries) per task of a meta-batch. The variable kind: four Meta-Dataset-size tasks of about 30
# ways and about 500 images each (METHOD §3.1 caps support at 500; here support + query ≈ 500). The JSON keys
# are "{method} {kind} {precision}".
FULL = {"backbone": "vit_small_patch16_dino", "image_size": 128, "eval_image_size": 224, "experts": 8,
        "episodes": {"fixed": [(5, 5, 15)] * 4,                      # 5-way 5-shot 15-query, B = 4
                     "variable": [(30, 10, 6), (25, 12, 8), (35, 8, 6), (28, 11, 7)]},   # 480-504 images
        "updates": 10, "eval_episodes": 20, "budget_seconds": 420}
# The CPU smoke run of the same code: the tiny ViT, 2 experts, tiny episodes, one timed update.
TINY = {"backbone": "vit_tiny_patch4_32", "image_size": 16, "eval_image_size": 32, "experts": 2,
        "episodes": {"fixed": [(3, 1, 2)] * 2, "variable": [(4, 2, 1), (3, 1, 2)]},
        "updates": 1, "eval_episodes": 2, "budget_seconds": 900}           # no budget to speak of: all run
PRECISIONS = {"fp16": ("fp16", False), "bf16": ("bf16", False), "fp16+compile": ("fp16", True)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def meta_update_rate(method: str, shapes: list, amp: str, compile: bool, plan: dict, device) -> dict:
    """Tasks/s of `plan["updates"]` meta-updates after one warm-up update (which also compiles), as `smat train`."""
    torch.manual_seed(0)
    size = plan["image_size"]
    config = TrainConfig(method=method, image_size=size, experts=plan["experts"], meta_batch=len(shapes), amp=amp)
    model = build_model(config, create_backbone(plan["backbone"], size)).to(device).train()
    if compile:
        model.backbone.compile()            # as the trainer does: in place, under functional_call
    optimisers = build_optimisers(model, config.optim)
    set_epoch_lr(optimisers, 5, config.schedule)                   # full learning rates, as after warm-up
    scaler = grad_scaler(device, amp)
    tasks = [episodes(1, w, s, q, size, device)[0] for w, s, q in shapes]

    def update(n_seen: int) -> None:
        for task in tasks:
            with autocast(device, amp):
                loss, _ = model.meta_loss(task, n_seen)
            scaler.scale(loss / len(tasks)).backward()
        step(optimisers, scaler)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    update(0)
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(plan["updates"]):
        update((i + 1) * len(tasks))
    sync(device)
    seconds = (time.perf_counter() - start) / plan["updates"]
    return {"tasks_per_s": len(tasks) / seconds, "seconds_per_update": seconds, "warmup_seconds": warmup,
            "peak_memory_mb": peak_memory_mb(device)}


def evaluation_rate(method: str, plan: dict, device, tmp: Path) -> dict:
    """Evaluation episodes/s (5-way 5-shot 15-query, no fine-tuning) at the evaluation size, after one warm-up."""
    root = tmp / "store"
    if not root.exists():       # 32-px classes of 20 images, upsampled by the test transform as any store is
        synthetic_store(tmp, n_classes=10, n_images=20)
        sample_to_file(root, "test", n=plan["eval_episodes"] + 1, seed=0, out=tmp / "eval.json",
                       ways=5, shots=5, queries=15)
    store = Store(root)
    eval_episodes, meta = load_episode_file(tmp / "eval.json", store)
    torch.manual_seed(0)
    config = TrainConfig(method=method, experts=plan["experts"])
    model = build_model(config, create_backbone(plan["backbone"], plan["eval_image_size"])).to(device).eval()
    runner = EpisodeRunner(model, store, "none", device)
    timed_run(runner, eval_episodes[:1], meta["seed"], 0)                     # warm-up
    sync(device)
    seconds, rows = timed_run(runner, eval_episodes[1:], meta["seed"], 0)
    sync(device)
    assert all(math.isfinite(r["accuracy"]) for r in rows)
    return {"episodes_per_s": len(rows) / seconds, "seconds_per_episode": seconds / len(rows)}


def device_record(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda, "torch": torch.__version__}
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return {"type": "cpu", "name": names[0] if names else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny ViT and small episodes (CPU smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder of the JSON")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except SmatError as err:
        raise SystemExit(f"gpu_check: {err}") from None
    plan = TINY if args.tiny else FULL
    set_matmul_precision(device, True)          # tf32: true, the training default (CUDA only)
    out = Path(args.out) / f"gpu_check_{device.type}.json"
    record = {"device": device_record(device),
              "settings": {"tiny": args.tiny, "tf32": device.type == "cuda",
                           **{k: v for k, v in plan.items() if k != "episodes"}},
              "meta_update": {}, "evaluation": {}, "failed": {}, "skipped": {},
              "data_parallel": "with >= 2 GPUs: python -m pytest tests/test_distributed.py (not run here)",
              "provenance": provenance()}
    start = time.perf_counter()

    def run(section: str, name: str, settings: dict, measure) -> None:
        if time.perf_counter() - start > plan["budget_seconds"]:      # keep the whole check within its slot
            record["skipped"][f"{section} {name}"] = f"time budget of {plan['budget_seconds']} s spent"
            return
        try:
            record[section][name] = {"settings": settings, **measure()}
            print(f"{section} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in record[section][name].items()
                                                   if k != "settings"), flush=True)
        except Exception as err:        # noqa: BLE001  one failure (say compilation) must not lose the rest
            first_line = (str(err).splitlines() or [""])[0][:300]
            record["failed"][f"{section} {name}"] = f"{type(err).__name__}: {first_line}"
            print(f"{section} {name}: FAILED {type(err).__name__}: {first_line}", flush=True)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write_json(out, {**record, "wall_seconds": time.perf_counter() - start})

    def meta_updates(compiled: bool) -> None:
        for precision, (amp, compile) in PRECISIONS.items():
            if compile != compiled:
                continue
            for kind, shapes in plan["episodes"].items():
                for method in ("smat", "pmf"):
                    name = f"{method} {kind} {precision}"
                    if compile and device.type != "cuda":
                        record["skipped"][f"meta_update {name}"] = "compile: CUDA only (as smat train)"
                        continue
                    settings = {"method": method, "episode": kind, "tasks_ways_shots_queries": shapes,
                                "meta_batch": len(shapes), "images_per_task": [w * (s + q) for w, s, q in shapes],
                                "amp": amp, "compile": compile, "autocast": dtype_name(autocast_dtype(device, amp)),
                                "updates": plan["updates"]}
                    run("meta_update", name, settings,
                        lambda: meta_update_rate(method, shapes, amp, compile, plan, device))

    def evaluations() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for method in ("smat", "pmf"):
                settings = {"method": method, "image_size": plan["eval_image_size"], "ways": 5, "shots": 5,
                            "queries": 15, "episodes": plan["eval_episodes"], "precision": "fp32",
                            "finetune": "none", "feature_cache": method == "pmf"}
                run("evaluation", method, settings, lambda: evaluation_rate(method, plan, device, Path(tmp)))

    # Compilation last: it is the slow and risky part, and the rest is recorded before it starts.
    meta_updates(compiled=False)
    evaluations()
    meta_updates(compiled=True)
    write_json(out, {**record, "wall_seconds": time.perf_counter() - start})
    print(f"recorded in {out} ({time.perf_counter() - start:.0f} s)")


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32 (no autocast)" if dtype is None else str(dtype).removeprefix("torch.")


if __name__ == "__main__":
    main()
