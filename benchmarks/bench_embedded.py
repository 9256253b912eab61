"""Build time of the embedded benchmark on one CPU core, and how hard each of its domains is for raw pixels.

1. Builds the benchmark (`smat data build-embedded`, default size) pinned to one core (like `taskset -c 0`)
   with one BLAS thread, and records wall-clock and CPU seconds, image count and bytes. Target: <= 60 s.
2. Difficulty: a nearest-centroid classifier on flattened raw pixels, over random 5-way 5-shot episodes
   (15 queries per class) of each domain's test classes (all classes for out-of-domain domains). Every
   domain should be well above chance (20 %) and, for most, below ~90 %.

    python benchmarks/bench_embedded.py [--size default] [--seed 0] [--episodes 100]
                                        [--out benchmarks/results/embedded_build.json]
"""

from __future__ import annotations

import os

# One core, one BLAS thread: the build must fit the budget on a single core (set before numpy loads).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from smat.data.embedded import build_embedded  # noqa: E402
from smat.io import provenance, write_json  # noqa: E402

WAYS, SHOTS, QUERIES = 5, 5, 15
TARGET_SECONDS = 60.0


def pin_to_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def timed_build(out: Path, size: str, seed: int) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    build_embedded(out, size=size, seed=seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    files = [p for p in out.rglob("*") if p.is_file()]
    pngs = [p for p in files if p.suffix == ".png" and p.parent.parent.name != "grids"]
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "images": len(pngs),
            "bytes": sum(p.stat().st_size for p in files), "target_s": TARGET_SECONDS}


def load_class(folder: Path) -> np.ndarray:
    """(n, 32*32*3) float pixels in [0, 1]."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return np.stack(images).reshape(len(images), -1).astype(np.float32) / 255.0


def nearest_centroid_accuracy(classes: list[np.ndarray], episodes: int, rng: np.random.Generator) -> list[float]:
    accuracies = []
    for _ in range(episodes):
        chosen = rng.choice(len(classes), WAYS, replace=False)
        prototypes, queries = [], []
        for c in chosen:
            order = rng.permutation(len(classes[c]))
            prototypes.append(classes[c][order[:SHOTS]].mean(axis=0))
            queries.append(classes[c][order[SHOTS:SHOTS + QUERIES]])
        prototypes = np.stack(prototypes)
        correct = total = 0
        for label, query in enumerate(queries):
            distance = ((query[:, None, :] - prototypes[None]) ** 2).sum(axis=2)
            correct += int((distance.argmin(axis=1) == label).sum())
            total += len(query)
        accuracies.append(100.0 * correct / total)
    return accuracies


def difficulty(root: Path, episodes: int, seed: int) -> dict:
    description = json.loads((root / "benchmark.json").read_text())
    results = {}
    for name, info in description["domains"].items():
        splits = json.loads((root / name / "splits.json").read_text())
        classes = [load_class(root / name / c) for c in splits["test"]]
        acc = np.array(nearest_centroid_accuracy(classes, episodes, np.random.default_rng([seed, len(results)])))
        results[name] = {"role": info["role"], "test_classes": len(classes), "accuracy": round(float(acc.mean()), 1),
                         "ci95": round(float(1.96 * acc.std(ddof=1) / np.sqrt(len(acc))), 1)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["default", "ci"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/embedded_build.json")
    args = parser.parse_args()

    core = pin_to_one_core()
    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as tmp:
        root = Path(tmp) / "embedded"
        build = timed_build(root, args.size, args.seed)
        print(f"build ({args.size}, seed {args.seed}, core {core}): {build['wall_s']} s wall, {build['cpu_s']} s CPU, "
              f"{build['images']} images, {build['bytes'] / 1e6:.1f} MB (target <= {TARGET_SECONDS:.0f} s)")
        domains = difficulty(root, args.episodes, args.seed)
    print(f"raw-pixel nearest-centroid, {WAYS}-way {SHOTS}-shot, {args.episodes} episodes (chance 20 %):")
    for name, r in domains.items():
        print(f"  {name:<18} {r['role']:<4} {r['test_classes']:>4} test classes  "
              f"{r['accuracy']:5.1f} ± {r['ci95']:.1f} %")
    write_json(args.out, {
        "build": {"size": args.size, "seed": args.seed, "core": core, **build},
        "difficulty": {"protocol": f"{WAYS}-way {SHOTS}-shot, {QUERIES} queries/class, nearest centroid "
                                   "on raw pixels, test classes", "episodes": args.episodes, "domains": domains},
        "provenance": provenance(),
    })
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
