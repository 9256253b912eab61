"""Cost of one meta-update: SMAT vs PMF on the same backbone and the same episodes (issue 4).

A meta-update is what `smat train` does per optimiser step: B tasks, each `meta_loss` + backward of loss / B,
then the optimiser step (smat.training.optim.step), under fp16 autocast + GradScaler on CUDA and fp32 on CPU.
Each method runs in its own child process so that peak memory is its own: peak RSS on CPU, peak allocated
GPU memory on CUDA. Episodes are fixed synthetic tensors (N-way, K-shot, Q queries per class), identical for
both methods. SMAT uses the paper configuration (M = 8, every piece on); PMF full fine-tuning.

    python benchmarks/bench_meta_update.py                                   # tiny ViT, CPU (the issue's ratio)
    python benchmarks/bench_meta_update.py --device cuda --backbone vit_small_patch16_dino --image-size 128 \
        --ways 20 --shots 10 --queries 10 --out benchmarks/results/meta_update_cuda.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from smat.config_loader import build_dataclass
from smat.data.loader import EpisodeTensors
from smat.device import autocast, resolve_device
from smat.io import provenance, write_json
from smat.methods.registry import build_model
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig
from smat.training.optim import build_optimisers, set_epoch_lr, step


def episodes(n: int, ways: int, shots: int, queries: int, size: int, device: torch.device) -> list[EpisodeTensors]:
    g = torch.Generator().manual_seed(0)
    return [EpisodeTensors(torch.randn(ways * shots, 3, size, size, generator=g), torch.arange(ways).repeat(shots),
                           torch.randn(ways * queries, 3, size, size, generator=g),
                           torch.arange(ways).repeat(queries), ways).to(device) for _ in range(n)]


def measure(args: argparse.Namespace) -> dict:
    """Child process: time `args.updates` meta-updates of `args.method` after one warm-up update."""
    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = build_dataclass(TrainConfig, {"method": args.method, "image_size": args.image_size,
                                           "experts": args.experts})
    model = build_model(config, create_backbone(args.backbone, args.image_size)).to(device).train()
    optimisers = build_optimisers(model, config.optim)
    set_epoch_lr(optimisers, 5, config.schedule)                   # full learning rates, as after warm-up
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    b = config.meta_batch
    tasks = episodes(b, args.ways, args.shots, args.queries, args.image_size, device)

    def update(n_seen: int) -> None:
        for episode in tasks:
            with autocast(device, amp):
                loss, _ = model.meta_loss(episode, n_seen)
            scaler.scale(loss / b).backward()
        step(optimisers, scaler)

    update(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    for i in range(args.updates):
        update((i + 1) * b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.updates
    record = {"method": args.method, "seconds_per_update": seconds, "tasks_per_second": b / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_rss_mb_before_timing": rss_before}
    if device.type == "cuda":
        record["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="vit_tiny_patch4_32")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--updates", type=int, default=5, help="timed meta-updates (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/meta_update_{device}.json")
    parser.add_argument("--method", choices=["smat", "pmf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:                                                 # child: print one JSON record
        print(json.dumps(measure(args)))
        return
    results = {}
    for method in ("smat", "pmf"):
        settings = {"--device": args.device, "--backbone": args.backbone, "--image-size": args.image_size,
                    "--experts": args.experts, "--ways": args.ways, "--shots": args.shots, "--queries": args.queries,
                    "--updates": args.updates, "--threads": args.threads or 0}
        child = [sys.executable, __file__, "--method", method, *[str(x) for kv in settings.items() for x in kv]]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{method}: {results[method]['seconds_per_update']:.3f} s per meta-update "
              f"({results[method]['tasks_per_second']:.2f} tasks/s), peak RSS {results[method]['peak_rss_mb']:.0f} MB"
              + (f", peak GPU {results[method]['peak_gpu_memory_mb']:.0f} MB" if "peak_gpu_memory_mb" in results[method]
                 else ""))
    ratio = {"time": results["smat"]["seconds_per_update"] / results["pmf"]["seconds_per_update"],
             "peak_rss": results["smat"]["peak_rss_mb"] / results["pmf"]["peak_rss_mb"]}
    if "peak_gpu_memory_mb" in results["smat"]:
        ratio["peak_gpu_memory"] = results["smat"]["peak_gpu_memory_mb"] / results["pmf"]["peak_gpu_memory_mb"]
    print("SMAT / PMF: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()) + " (target: time <= 2.5)")
    out = Path(args.out or Path(__file__).parent / "results" / f"meta_update_{resolve_device(args.device).type}.json")
    write_json(out, {"settings": {k: v for k, v in vars(args).items() if k not in ("method", "out")},
                     "results": results, "smat_over_pmf": ratio, "provenance": provenance()})
    print(f"recorded in {out}")


if __name__ == "__main__":
    main()
