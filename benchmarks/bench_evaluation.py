"""Evaluation speed: feature caching for Pre/PMF, and batched test-time fine-tuning against one episode at a time.

1. `--parts cache`: Pre and PMF without fine-tuning, with and without the feature cache, on the same
   variable-way variable-shot episodes (METHOD §3.1 rules): episodes/s and the speed-up (target >= 10x), the
   accuracies of both runs identical; SMAT (M = 8) without fine-tuning: episodes/s.
2. `--parts finetune`: fine-tuned episodes per second (50 AdamW steps, METHOD §3.5) of SMAT (M = 8, random
   δ) and of Pre, full and LoRA, batched (`smat.evaluation.finetune`, one batch of `--batch` episodes) against
   one at a time (the plain one-episode recipe of tests/test_batched_finetune.py with the model's own
   attention kernel, i.e. the code before batching; and the batched code with one episode per batch), at
   - the embedded size: 5-way 1-shot, 10 queries per class, 32 px, the committed `vit_tiny_patch4_32`;
   - Meta-Dataset-like variable-way variable-shot episodes (METHOD §3.1) on the same tiny ViT;
   timed over `--steps` / `--variable-steps` steps and scaled to 50 (a step costs the same every time; the
   final scoring pass is then over-weighted, equally in both).
   Batched and one-at-a-time runs alternate within one process, so their ratio holds on a shared machine.
   For a GPU check: `--device cuda --arch vit_small_patch16_224 --image-size 224` (5-way 5-shot, 15 queries,
   random weights; the batch is then the measured CUDA bound unless --batch is given).

The store is `--store DIR`, or else a synthetic store of the embedded benchmark's shape (32-px images, 20 per
class, 25 test classes, i.e. one in-domain test split).

    python benchmarks/bench_evaluation.py [--parts cache finetune] [--threads 2] [--device cpu]
                                          [--out benchmarks/results/evaluation.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smat.data.episodes import load_episode_file, sample_to_file
from smat.data.store import Store, convert_imagefolder
from smat.device import resolve_device
from smat.data.loader import load_episode
from smat.data.transforms import test_transform
from smat.evaluation.batching import CPU_BUDGET, BatchBudget, plan_batches
from smat.evaluation.evaluate import EpisodeRunner, episode_seed
from smat.evaluation.finetune import FINETUNE_STEPS, Finetuner, Task
from smat.io import provenance, read_json, write_json
from smat.models.backbones import BACKBONES
from smat.methods.pmf import PMF
from smat.methods.pre import Pre
from smat.methods.registry import build_model
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig

ARCH = "vit_tiny_patch4_32"
COMMITTED = Path("config/pretrained/vit_tiny_patch4_32-embedded.safetensors")
SPEEDUP_TARGET = 10.0
FINETUNE_TARGET = 5.0      # batched / one at a time, 2 CPU cores, embedded size
LR = 1e-3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_batched_finetune import reference_logits  # noqa: E402  (the one-episode recipe)


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


def backbone_name(arch: str) -> str:
    """A BACKBONES name, or the timm architecture of one (vit_small_patch16_224 -> vit_small_patch16_dino)."""
    if arch in BACKBONES:
        return arch
    for name, spec in BACKBONES.items():
        if spec["timm_arch"] == arch:
            return name
    raise SystemExit(f"--arch {arch}: not one of {', '.join(BACKBONES)} or their timm architectures")


def finetune_models(arch: str, image_size: int | None, device) -> dict:
    """Pre and SMAT (M = 8, random δ) around the committed tiny ViT, or around random weights of `arch`."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    backbone = create_backbone(arch, image_size, dynamic_img_size=True)
    if arch == ARCH and COMMITTED.is_file():
        backbone.vit.load_state_dict(load_file(COMMITTED))
    smat = build_model(TrainConfig(method="smat", experts=8), backbone)
    with torch.no_grad():
        smat.experts.delta.normal_(0, 0.02)
    pre = Pre(create_backbone(arch, image_size, dynamic_img_size=True))
    pre.backbone.load_state_dict(backbone.state_dict())
    return {"smat": smat.to(device).eval(), "pre": pre.to(device).eval()}


def finetune_comparison(model, mode: str, tensors: list, seeds: list[int], batch: int, singles: int, steps: int,
                        rounds: int) -> dict:
    """Episodes/s (scaled to 50 steps) batched vs one at a time, alternating, summed over `rounds`."""
    finetuner = Finetuner(model, mode, steps=steps)
    weights = [model.task_params(t.support_x, t.support_y).weights for t in tensors]
    tasks = lambda ids: [Task(weights[i], tensors[i], LR, torch.Generator().manual_seed(seeds[i]))  # noqa: E731
                         for i in ids]
    seconds = {"batched": 0.0, "one_batch_each": 0.0, "before_batching": 0.0}
    done = {"batched": 0, "one_batch_each": 0, "before_batching": 0}
    sync = (lambda: torch.cuda.synchronize()) if tensors[0].support_x.is_cuda else (lambda: None)  # noqa: E731
    finetuner.query_logits(tasks([0]))          # warm-up
    for _ in range(rounds):
        for kind in seconds:
            start = time.perf_counter()
            if kind == "batched":       # cut as EpisodeRunner cuts them: by support size, within the bounds
                sizes = [len(t.support_y) for t in tensors]
                for ids in plan_batches(sizes, BatchBudget(batch, max(CPU_BUDGET.images, 2 * batch * min(sizes)),
                                                           "benchmark")):
                    finetuner.query_logits(tasks(ids))
                n = len(tensors)
            else:
                for i in range(singles):
                    if kind == "one_batch_each":
                        finetuner.query_logits(tasks([i]))
                    else:
                        reference_logits(model, mode, weights[i], tensors[i], LR, seeds[i], steps=steps, fused=True)
                n = singles
            sync()
            seconds[kind] += time.perf_counter() - start
            done[kind] += n
    scale = steps / FINETUNE_STEPS
    rate = {kind: done[kind] / seconds[kind] * scale for kind in seconds}
    return {"episodes_per_s": rate, "speedup_vs_before": rate["batched"] / rate["before_batching"],
            "speedup_vs_one_batch_each": rate["batched"] / rate["one_batch_each"],
            "episodes": {"batched": len(tensors), "one_at_a_time": singles}, "batch": batch,
            "steps_timed": steps, "rounds": rounds}


def run_finetune_part(args, device, store, store_root: Path, tmp: Path) -> dict:
    arch = backbone_name(args.arch)
    models = finetune_models(arch, args.image_size, device)
    size = args.image_size or BACKBONES[arch]["image_size"]
    transform = test_transform(size)
    kinds = {"embedded": dict(ways=5, shots=1, queries=10)} if arch == ARCH else \
        {"5-way 5-shot": dict(ways=5, shots=5, queries=15)}
    if arch == ARCH:
        kinds["meta-dataset-like"] = {}
    record = {}
    for kind, shape in kinds.items():
        if args.kinds and kind not in args.kinds:
            continue
        variable = not shape
        n = args.variable_episodes if variable else args.finetune_episodes
        sample_to_file(store_root, "test", n=n, seed=2, out=tmp / f"{kind}.json", **shape)
        episodes, meta = load_episode_file(tmp / f"{kind}.json", store)
        tensors = [load_episode(store, e, transform).to(device) for e in episodes]
        seeds = [episode_seed(i, meta["seed"]) for i in range(len(episodes))]
        batch = args.batch or (len(episodes) if device.type == "cuda" else CPU_BUDGET.episodes)
        steps = args.variable_steps if variable else args.steps
        for name in args.methods:
            model = models[name]
            for mode in ("full", "lora"):
                entry = finetune_comparison(model, mode, tensors, seeds, batch, args.singles, steps, args.rounds)
                entry["episodes_shape"] = {
                    "ways": [len(e.classes) for e in episodes], "support": [sum(map(len, e.support)) for e in episodes],
                    "query": [sum(map(len, e.query)) for e in episodes]} if variable else shape
                record[f"{kind} {name}+{mode}"] = entry
                rate = entry["episodes_per_s"]
                print(f"{kind:18s} {name}+{mode:4s}: batched {rate['batched']:7.3f} ep/s, one at a time "
                      f"{rate['before_batching']:7.3f} ep/s (batched code, batch 1: {rate['one_batch_each']:7.3f}); "
                      f"speed-up {entry['speedup_vs_before']:.2f}x", flush=True)
    return {"finetuning_batched": record, "finetuning_setup": {
        "backbone": arch, "image_size": size, "weights": str(COMMITTED) if arch == ARCH else "random",
        "lr": LR, "speedup_target_embedded_cpu": FINETUNE_TARGET,
        "one_at_a_time": "tests/test_batched_finetune.py reference_logits(fused=True): torch.optim.AdamW, "
                         "model.features, PEFT LoRA; the code before batching"}}


def run_cache_part(args, device, store, store_root: Path, tmp: Path) -> dict:
    sample_to_file(store_root, "test", n=args.episodes, seed=0, out=tmp / "variable.json")
    variable, meta = load_episode_file(tmp / "variable.json", store)
    torch.manual_seed(0)
    models = {
        "pre": Pre(create_backbone(ARCH)),
        "pmf": PMF(create_backbone(ARCH)),
        "smat": build_model(TrainConfig(method="smat", experts=8), create_backbone(ARCH)),
    }
    models = {name: model.to(device).eval() for name, model in models.items()}
    record: dict = {}
    for name in ("pre", "pmf"):
        cached_s, cached = timed_run(EpisodeRunner(models[name], store, "none", device), variable, meta["seed"], 0)
        direct_s, direct = timed_run(EpisodeRunner(models[name], store, "none", device, use_cache=False),
                                     variable, meta["seed"], 0)
        identical = [r["accuracy"] for r in cached] == [r["accuracy"] for r in direct]
        entry = {"episodes_per_s_cached": len(variable) / cached_s,
                 "episodes_per_s_uncached": len(variable) / direct_s,
                 "speedup": direct_s / cached_s, "identical_accuracies": identical}
        record[name] = entry
        print(f"{name:5s} none: cached {entry['episodes_per_s_cached']:8.2f} ep/s, uncached "
              f"{entry['episodes_per_s_uncached']:6.2f} ep/s, speed-up {entry['speedup']:.1f}x "
              f"(target >= {SPEEDUP_TARGET:.0f}x), identical accuracies: {identical}")
    smat_s, _ = timed_run(EpisodeRunner(models["smat"], store, "none", device), variable, meta["seed"], 0)
    record["smat"] = {"episodes_per_s": len(variable) / smat_s}
    print(f"smat  none: {len(variable) / smat_s:.2f} ep/s")
    sizes = [(len(e.classes), sum(map(len, e.support)), sum(map(len, e.query))) for e in variable]
    distinct = {(c, i) for e in variable for k, c in enumerate(e.classes) for i in e.support[k] + e.query[k]}
    return {"no_finetuning": record, "speedup_target": SPEEDUP_TARGET, "episodes": {
        "variable_way": len(variable), "mean_ways": float(np.mean([s[0] for s in sizes])),
        "mean_support": float(np.mean([s[1] for s in sizes])), "mean_query": float(np.mean([s[2] for s in sizes])),
        "images_embedded_uncached": int(sum(s[1] + s[2] for s in sizes)), "distinct_images": len(distinct)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("cache", "finetune"), default=["cache", "finetune"])
    parser.add_argument("--store", default=None, help="dataset store with test classes (default: synthetic)")
    parser.add_argument("--episodes", type=int, default=50, help="variable-way episodes for no fine-tuning")
    parser.add_argument("--finetune-episodes", type=int, default=16, help="fixed-shape episodes fine-tuned batched")
    parser.add_argument("--variable-episodes", type=int, default=8, help="variable episodes fine-tuned batched")
    parser.add_argument("--steps", type=int, default=FINETUNE_STEPS, help="steps timed on fixed-shape episodes")
    parser.add_argument("--variable-steps", type=int, default=5, help="steps timed on variable episodes")
    parser.add_argument("--singles", type=int, default=2, help="episodes fine-tuned one at a time per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of batched and one-at-a-time runs")
    parser.add_argument("--batch", type=int, default=None, help="episodes per batch (default: CPU_BUDGET's, "
                        "or all on CUDA)")
    parser.add_argument("--arch", default=ARCH, help="backbone for the fine-tuning part")
    parser.add_argument("--methods", nargs="+", choices=("smat", "pre"), default=["smat"],
                        help="models fine-tuned (SMAT: per-episode base weights; Pre: LoRA shares them)")
    parser.add_argument("--kinds", nargs="+", default=None, choices=("embedded", "meta-dataset-like", "5-way 5-shot"),
                        help="episode kinds of the fine-tuning part (default: all for the backbone)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/evaluation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    out = Path(args.out)
    # A part not run this time keeps its figures of the last run (each part records its own provenance).
    record = read_json(out) if out.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="bench-evaluation-") as tmp:
        tmp = Path(tmp)
        store_root = Path(args.store) if args.store else synthetic_store(tmp)
        store = Store(store_root)
        common = {"store": {"source": args.store or "synthetic (25 test classes x 20 images, 32 px)",
                            "domain": store.domain, "test_classes": len(store.class_ids("test"))},
                  "device": str(device), "threads": args.threads,
                  "provenance": provenance(command="benchmarks/bench_evaluation.py", argv=vars(args))}
        if "cache" in args.parts:
            record["cache_part"] = {**run_cache_part(args, device, store, store_root, tmp), **common}
        if "finetune" in args.parts:
            part = run_finetune_part(args, device, store, store_root, tmp)
            kept = record.get("finetune_part", {}).get("finetuning_batched", {}) if args.kinds else {}
            # Figures of other kinds are kept from their own run (their entries carry the run's provenance).
            for entry in part["finetuning_batched"].values():
                entry["provenance"] = common["provenance"]
            part["finetuning_batched"] = {**kept, **part["finetuning_batched"]}
            record["finetune_part"] = {**part, **common}
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
