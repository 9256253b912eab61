"""Pre-training budget and feature quality on the embedded benchmark.

Builds the embedded benchmark and its stores under --work (once), runs `smat pretrain` with the default
settings (config/pretrain/embedded.yaml, plus any --set) on the train classes of the pre-training corpus
(the benchmark's `pretrain` domains), then scores frozen features with 5-way 5-shot nearest-prototype
(cosine) episodes on the test classes of every domain, 100 fixed episodes each, against raw pixels (the
same normalised test-transform input, flattened) and against the same network with random weights. Prints
a table and merges the numbers, the wall time, the CPU time and the machine load into
benchmarks/results/pretrain.json under --label. --check-committed also compares the weights, byte for
byte, with the committed backbone that the default workflow fetches.

    python benchmarks/bench_pretrain.py --work /tmp/smat-bench [--label NAME] [--set KEY=VALUE] [--threads N]
                                        [--check-committed]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smat.data.embedded import build_embedded
from smat.data.episodes import sample_episodes
from smat.data.store import Store, convert_imagefolder
from smat.data.transforms import test_transform
from smat.io import provenance, read_json, sha256_file, write_json
from smat.models.backbones import create_backbone
from smat.models.pretrained import load_pretrained
from smat.training.pretrain import pretrain

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pretrain.json"
COMMITTED = ROOT / "config" / "pretrained" / "vit_tiny_patch4_32-embedded.safetensors"
WAYS, SHOTS, QUERIES, EPISODES, SEED = 5, 5, 15, 100, 0
# Glyph domains in θ_pre's corpus besides the benchmark's pre-training domains (config/config.yaml): their
# train classes only, as converted with --role id.
GLYPH_CORPUS = ("math-symbols",)


def prepare(work: Path) -> dict[str, list[Path]]:
    """Stores by benchmark role, building the raw benchmark and converting it when missing."""
    raw = work / "raw"
    if not (raw / "benchmark.json").is_file():
        build_embedded(raw, size="default", seed=0)
    domains = read_json(raw / "benchmark.json")["domains"]
    stores = {"pretrain": [], "id": [], "ood": []}
    for name, info in domains.items():
        store = work / "stores" / name
        if not (store / "manifest.json").is_file():  # the class splits come from the domain's splits.json
            convert_imagefolder(raw / name, store, role="ood" if info["role"] == "ood" else "id", domain=name)
        stores["pretrain" if name in GLYPH_CORPUS else info["role"]].append(store)
    # The corpus in the order of the documented command (config/config.yaml): the glyph domains last.
    stores["pretrain"].sort(key=lambda store: store.name in GLYPH_CORPUS)
    return stores


def episode_accuracies(store: Store, features: dict[int, torch.Tensor]) -> np.ndarray:
    """Query accuracy (%) of cosine nearest-prototype classification on each fixed test episode."""
    accuracies = []
    # The corpus domains hold 12 images per class: fewer queries there, the same episodes elsewhere.
    fewest = min(store.classes[c].n_images for c in store.class_ids("test"))
    queries = min(QUERIES, fewest - SHOTS)
    for episode in sample_episodes(store, "test", EPISODES, SEED, ways=WAYS, shots=SHOTS, queries=queries):
        support = torch.stack([features[c][ids].mean(0) for c, ids in zip(episode.classes, episode.support)])
        query = torch.cat([features[c][ids] for c, ids in zip(episode.classes, episode.query)])
        labels = torch.repeat_interleave(torch.arange(len(episode.classes)),
                                         torch.tensor([len(ids) for ids in episode.query]))
        logits = F.normalize(query, dim=1) @ F.normalize(support, dim=1).T
        accuracies.append(100.0 * (logits.argmax(1) == labels).float().mean().item())
    return np.array(accuracies)


@torch.no_grad()
def class_features(store: Store, encoders: dict[str, torch.nn.Module | None]
                   ) -> dict[str, dict[int, torch.Tensor]]:
    """Per encoder (None = raw pixels), the features of every image of every test class."""
    transform = test_transform(store.image_size)
    out = {name: {} for name in encoders}
    for class_id in store.class_ids("test"):
        x = transform(store.images(class_id, range(store.classes[class_id].n_images)))
        for name, encoder in encoders.items():
            out[name][class_id] = x.flatten(1) if encoder is None else encoder(x)
    return out


def summary(accuracies: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(accuracies.mean()), 2),
            "ci95": round(float(1.96 * accuracies.std(ddof=1) / np.sqrt(len(accuracies))), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/smat-bench-pretrain"))
    parser.add_argument("--label", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--config", default=str(ROOT / "config/pretrain/embedded.yaml"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 measures CPU cost best on a shared machine")
    parser.add_argument("--check-committed", action="store_true",
                        help=f"compare the weights byte for byte with {COMMITTED.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    stores = prepare(args.work)
    out = args.work / f"pretrained-{args.label}.pt"
    weights = out.with_suffix(".safetensors")
    out.with_name(out.name + ".partial").unlink(missing_ok=True)
    load_before = os.getloadavg()
    cpu_before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    pretrain(stores["pretrain"], out, config=args.config, overrides=args.set, device="cpu", weights_out=weights)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    load_after = os.getloadavg()

    backbone, record = load_pretrained(out)
    torch.manual_seed(0)
    encoders = {"features": backbone.eval(), "random_init": create_backbone(record["arch"]).eval(), "pixels": None}
    domains = {}
    print(f"\n{'domain':<20}{'role':<9}" + "".join(f"{name:>16}" for name in encoders))
    for role, roots in stores.items():
        for root in roots:
            store = Store(root)
            features = class_features(store, encoders)
            scores = {name: summary(episode_accuracies(store, features[name])) for name in encoders}
            domains[store.domain] = {"role": role, **scores}
            print(f"{store.domain:<20}{role:<9}" + "".join(
                f"{s['mean']:>9.1f} ± {s['ci95']:<4.1f}" for s in scores.values()))
    id_wins = sum(d["features"]["mean"] > d["pixels"]["mean"] for d in domains.values() if d["role"] == "id")
    n_id = sum(d["role"] == "id" for d in domains.values())
    meta = record["meta"]
    result = {
        "arch": record["arch"],
        "overrides": args.set,
        "config": meta["config"],
        "n_classes": meta["n_classes"],
        "n_images": meta["n_images"],
        "steps": meta["steps"],
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "train_images_per_second": round(meta["steps"] * meta["config"]["batch_size"] / wall, 1),
        "threads": torch.get_num_threads(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "episodes": {"ways": WAYS, "shots": SHOTS, "queries": f"{QUERIES} (fewer where a class has fewer than {SHOTS + QUERIES} images)", "n": EPISODES, "seed": SEED},
        "id_domains_features_beat_pixels": f"{id_wins}/{n_id}",
        "mean_id": {k: round(float(np.mean([d[k]["mean"] for d in domains.values() if d["role"] == "id"])), 2)
                    for k in encoders},
        "mean_ood": {k: round(float(np.mean([d[k]["mean"] for d in domains.values() if d["role"] == "ood"])), 2)
                     for k in encoders},
        "domains": domains,
        "provenance": provenance(),
    }
    print(f"\nfeatures beat pixels on {id_wins}/{n_id} ID domains; mean ID {result['mean_id']}, "
          f"mean OOD {result['mean_ood']}")
    print(f"pre-training: {wall:.0f} s wall, {cpu:.0f} s CPU, {result['train_images_per_second']} img/s, "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")
    if args.check_committed:
        same = sha256_file(weights) == sha256_file(COMMITTED)
        result["matches_committed"] = same
        print(f"weights {'are identical to' if same else 'DIFFER from'} {COMMITTED.relative_to(ROOT)}")
    results = read_json(RESULTS) if RESULTS.is_file() else {}
    results[args.label] = result
    write_json(RESULTS, results)
    print(f"recorded in {RESULTS} under {args.label!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
