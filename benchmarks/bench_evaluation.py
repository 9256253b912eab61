"""Evaluation speed: feature caching for Pre/PMF, SMAT episodes/s, fine-tuning seconds per episode.

1. Pre and PMF without fine-tuning, with and without the feature cache, on the same variable-way
   variable-shot episodes (METHOD §3.1 rules): episodes/s and the speed-up (target >= 10x). The accuracies of
   both runs must be identical.
2. SMAT (M = 8) without fine-tuning: episodes/s (task-dependent weights: no cache possible).
3. Full and LoRA fine-tuning (50 steps, METHOD §3.5) of Pre and SMAT on fixed 5-way 5-shot 15-query episodes:
   seconds per episode.

The store is `--store DIR` (e.g. a converted domain of the embedded benchmark), or else a synthetic store of
the embedded benchmark's shape (32-px images, 20 per class, 25 test classes, i.e. one in-domain test split).
Models are the tiny ViT with random weights: speed does not depend on the weights. All ratios come from one
run on one machine, so they hold even when the machine is shared.

    python benchmarks/bench_evaluation.py [--store DIR] [--episodes 50] [--finetune-episodes 3]
                                          [--threads 1] [--device cpu] [--out benchmarks/results/evaluation.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smat.data.episodes import load_episode_file, sample_to_file
from smat.data.store import Store, convert_imagefolder
from smat.device import resolve_device
from smat.evaluation.evaluate import EpisodeRunner
from smat.io import provenance, write_json
from smat.methods.pmf import PMF
from smat.methods.pre import Pre
from smat.methods.registry import build_model
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig

ARCH = "vit_tiny_patch4_32"
SPEEDUP_TARGET = 10.0


def synthetic_store(root: Path, n_classes: int = 25, n_images: int = 20, seed: int = 0) -> Path:
    """A store shaped like one embedded test split: textured 32-px classes, 20 images each."""
    rng = np.random.default_rng(seed)
    src = root / "raw"
    yy, xx = np.mgrid[0:32, 0:32]
    for c in range(n_classes):
        colour, period, angle = rng.integers(30, 225, size=3), 2 + c % 7, rng.uniform(0, np.pi)
        (src / f"class{c:03d}").mkdir(parents=True)
        for i in range(n_images):
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + phase)[..., None]
            pixels = np.clip(colour + 50 * wave + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(src / f"class{c:03d}" / f"{i}.png")
    return convert_imagefolder(src, root / "store", role="ood", domain="synthetic").root


def timed_run(runner: EpisodeRunner, episodes, seed: int, lr: float) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    results = runner.run(episodes, range(len(episodes)), seed, lr, progress=False)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="dataset store with test classes (default: synthetic)")
    parser.add_argument("--episodes", type=int, default=50, help="variable-way episodes for no fine-tuning")
    parser.add_argument("--finetune-episodes", type=int, default=3, help="5-way 5-shot episodes per fine-tuning")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: robust when shared)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/evaluation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory(prefix="bench-evaluation-") as tmp:
        tmp = Path(tmp)
        store_root = Path(args.store) if args.store else synthetic_store(tmp)
        store = Store(store_root)
        sample_to_file(store_root, "test", n=args.episodes, seed=0, out=tmp / "variable.json")
        sample_to_file(store_root, "test", n=args.finetune_episodes, seed=1, out=tmp / "fixed.json",
                       ways=5, shots=5, queries=15)
        variable, meta = load_episode_file(tmp / "variable.json", store)
        fixed, fixed_meta = load_episode_file(tmp / "fixed.json", store)

        torch.manual_seed(0)
        models = {
            "pre": Pre(create_backbone(ARCH)),
            "pmf": PMF(create_backbone(ARCH)),
            "smat": build_model(TrainConfig(method="smat", experts=8), create_backbone(ARCH)),
        }
        models = {name: model.to(device).eval() for name, model in models.items()}
        record: dict = {"no_finetuning": {}, "finetuning": {}}

        for name in ("pre", "pmf"):
            cached_s, cached = timed_run(EpisodeRunner(models[name], store, "none", device), variable, meta["seed"], 0)
            direct_s, direct = timed_run(EpisodeRunner(models[name], store, "none", device, use_cache=False),
                                         variable, meta["seed"], 0)
            identical = [r["accuracy"] for r in cached] == [r["accuracy"] for r in direct]
            entry = {"episodes_per_s_cached": len(variable) / cached_s,
                     "episodes_per_s_uncached": len(variable) / direct_s,
                     "speedup": direct_s / cached_s, "identical_accuracies": identical}
            record["no_finetuning"][name] = entry
            print(f"{name:5s} none: cached {entry['episodes_per_s_cached']:8.2f} ep/s, uncached "
                  f"{entry['episodes_per_s_uncached']:6.2f} ep/s, speed-up {entry['speedup']:.1f}x "
                  f"(target >= {SPEEDUP_TARGET:.0f}x), identical accuracies: {identical}")
        smat_s, _ = timed_run(EpisodeRunner(models["smat"], store, "none", device), variable, meta["seed"], 0)
        record["no_finetuning"]["smat"] = {"episodes_per_s": len(variable) / smat_s}
        print(f"smat  none: {len(variable) / smat_s:.2f} ep/s")

        for name in ("pre", "smat"):
            for finetune in ("full", "lora"):
                runner = EpisodeRunner(models[name], store, finetune, device)
                seconds, _ = timed_run(runner, fixed, fixed_meta["seed"], 1e-4)
                record["finetuning"][f"{name}+{finetune}"] = {"seconds_per_episode": seconds / len(fixed)}
                print(f"{name}+{finetune}: {seconds / len(fixed):.2f} s/episode (50 steps, 5-way 5-shot)")

        sizes = [(len(e.classes), sum(map(len, e.support)), sum(map(len, e.query))) for e in variable]
        distinct = {(c, i) for e in variable for k, c in enumerate(e.classes) for i in e.support[k] + e.query[k]}
        record.update({
            "speedup_target": SPEEDUP_TARGET,
            "store": {"source": args.store or "synthetic (25 test classes x 20 images, 32 px)",
                      "domain": store.domain, "test_classes": len(store.class_ids("test"))},
            "episodes": {"variable_way": len(variable), "mean_ways": float(np.mean([s[0] for s in sizes])),
                         "mean_support": float(np.mean([s[1] for s in sizes])),
                         "mean_query": float(np.mean([s[2] for s in sizes])),
                         "images_embedded_uncached": int(sum(s[1] + s[2] for s in sizes)),
                         "distinct_images": len(distinct),
                         "finetuning": f"{len(fixed)} x 5-way 5-shot 15-query, 50 steps, lr 1e-4"},
            "backbone": ARCH, "device": str(device), "threads": args.threads,
            "provenance": provenance(command="benchmarks/bench_evaluation.py", argv=vars(args)),
        })
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
