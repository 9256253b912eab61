"""Store format by measurement: memory-mapped .npy versus HDF5, for episode-shaped random reads.

For each image size, a synthetic domain (random pixels; decoding is not part of the comparison) is written
in four layouts:
  npy            one (N, S, S, 3) uint8 images.npy read with np.load(mmap_mode="r") (the Store's format)
  h5-single      one HDF5 dataset (N, S, S, 3), one chunk per image
  h5-per-class   one HDF5 dataset per class, one chunk per image
  h5-per-image   one HDF5 group per image (PMF's per-class h5 layout, METHOD §4.1)
Reads follow real variable-way variable-shot episodes (smat.data.episodes, METHOD §3.1 caps): every support and
query image of an episode, class by class. "warm" reads come from the page cache; "cold" reads drop the
files' pages first (posix_fadvise DONTNEED, per file, no privileges needed). The second part times episode
assembly end to end (Store reads + transform, smat.data.loader.load_episode) on one CPU thread.

    python benchmarks/bench_store_format.py [--quick] [--out benchmarks/results/store_format.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import torch

from smat.data.episodes import SamplerConfig, make_sampler
from smat.data.loader import load_episode
from smat.data.store import FORMAT, Store
from smat.data.transforms import test_transform, train_transform
from smat.io import provenance, sha256_file, write_json

LAYOUTS = ("npy", "h5-single", "h5-per-class", "h5-per-image")


def synthetic_classes(n_classes: int, per_class: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(per_class // 2, per_class * 3 // 2 + 1, size=n_classes)
    return [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in counts]


def build(layout: str, folder: Path, classes: list[np.ndarray]) -> None:
    folder.mkdir(parents=True)
    size = classes[0].shape[1]
    if layout == "npy":
        n = sum(len(c) for c in classes)
        shape = (n, size, size, 3)
        images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        row = 0
        for c in classes:
            for image in c:  # one image at a time, as the converter writes decoded files
                images[row] = image
                row += 1
        images.flush()
        del images
        offsets = np.cumsum([0] + [len(c) for c in classes[:-1]]).tolist()
        write_json(folder / "manifest.json", {
            "format": FORMAT, "domain": "bench", "image_size": size, "hierarchy": "flat",
            "classes": [{"name": f"c{i}", "split": "test", "n_images": len(c), "offset": o, "group": None}
                        for i, (c, o) in enumerate(zip(classes, offsets))],
            "dag": None, "excluded": [], "skipped_images": [],
            "images_sha256": sha256_file(folder / "images.npy"), "source": "synthetic", "provenance": {},
        })
        return
    with h5py.File(folder / "images.h5", "w") as h5:
        if layout == "h5-single":
            n = sum(len(c) for c in classes)
            dset = h5.create_dataset("images", (n, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3))
            row = 0
            for c in classes:
                for image in c:
                    dset[row] = image
                    row += 1
        elif layout == "h5-per-class":
            for i, c in enumerate(classes):
                dset = h5.create_dataset(f"c{i}", c.shape, dtype=np.uint8, chunks=(1, size, size, 3))
                for j, image in enumerate(c):
                    dset[j] = image
        else:
            for i, c in enumerate(classes):
                group = h5.create_group(f"c{i}")
                for j, image in enumerate(c):
                    group.create_group(str(j)).create_dataset("image", data=image)


class Reader:
    """Reads images by (class, ids) from one layout."""

    def __init__(self, layout: str, folder: Path, offsets: list[int]) -> None:
        self.layout, self.offsets = layout, offsets
        if layout == "npy":
            self.store = Store(folder)
        else:
            self.h5 = h5py.File(folder / "images.h5", "r")

    def read(self, c: int, ids: list[int]) -> np.ndarray:
        if self.layout == "npy":
            return self.store.images(c, ids)
        # One read per image: h5py's list (point) selections are several times slower still.
        if self.layout == "h5-single":
            dset = self.h5["images"]
            return np.stack([dset[self.offsets[c] + i] for i in ids])
        if self.layout == "h5-per-class":
            dset = self.h5[f"c{c}"]
            return np.stack([dset[i] for i in ids])
        return np.stack([self.h5[f"c{c}/{i}/image"][()] for i in ids])

    def close(self) -> None:
        if self.layout != "npy":
            self.h5.close()


def drop_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_throughput(layout: str, folder: Path, offsets: list[int], episodes: list, cold: bool,
                    repeats: int) -> float:
    n_images = sum(len(s) + len(q) for e in episodes for s, q in zip(e.support, e.query))
    best = float("inf")
    for _ in range(repeats):
        if cold:
            drop_page_cache(folder)
        reader = Reader(layout, folder, offsets)
        start = time.perf_counter()
        for e in episodes:
            for c, s, q in zip(e.classes, e.support, e.query):
                reader.read(c, s + q)
        best = min(best, time.perf_counter() - start)
        reader.close()
    return n_images / best


def assembly_throughput(store: Store, episodes: list, size: int, repeats: int) -> dict[str, float]:
    n_images = sum(len(s) + len(q) for e in episodes for s, q in zip(e.support, e.query))
    out = {}
    for name, transform, generator in (("test", test_transform(size), None),
                                       ("train", train_transform(size), torch.Generator().manual_seed(0))):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for e in episodes:
                load_episode(store, e, transform, generator)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_images_per_s"] = round(n_images / best)
        out[f"{name}_ms_per_500_images"] = round(1000 * best / n_images * 500, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer episodes (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "store_format.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    # (image size, classes, mean images per class, episodes)
    settings = [(32, 20, 40, 5), (128, 8, 30, 3)] if args.quick else [(32, 200, 100, 25), (128, 60, 60, 10)]
    config = SamplerConfig()
    load_before = os.getloadavg()  # the machine may be shared: other work slows every layout alike
    results, assembly = [], []
    work = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        for size, n_classes, per_class, n_episodes in settings:
            classes = synthetic_classes(n_classes, per_class, size, seed=size)
            offsets = np.cumsum([0] + [len(c) for c in classes[:-1]]).tolist()
            n_total = sum(len(c) for c in classes)
            for layout in LAYOUTS:
                folder = work / f"{layout}-{size}"
                start = time.perf_counter()
                build(layout, folder, classes)
                build_s = time.perf_counter() - start
                if layout == "npy":
                    store = Store(folder)
                    rng = np.random.default_rng(0)
                    sampler = make_sampler(store, "test", config)
                    episodes = [sampler.sample(rng) for _ in range(n_episodes)]
                row = {
                    "layout": layout, "image_size": size, "n_classes": n_classes, "n_images": n_total,
                    "build_s": round(build_s, 3), "build_images_per_s": round(n_total / build_s),
                    "file_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 1),
                    "read_warm_images_per_s": round(read_throughput(layout, folder, offsets, episodes, False, 3)),
                    "read_cold_images_per_s": round(read_throughput(layout, folder, offsets, episodes, True, 2)),
                }
                print(json.dumps(row), flush=True)
                results.append(row)
            assembly_row = {"image_size": size, "n_episodes": n_episodes,
                            **assembly_throughput(Store(work / f"npy-{size}"), episodes, size, 2)}
            print(json.dumps(assembly_row), flush=True)
            assembly.append(assembly_row)
            for layout in LAYOUTS:
                shutil.rmtree(work / f"{layout}-{size}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, {
        "benchmark": "store_format", "quick": args.quick,
        "settings": [dict(zip(("image_size", "n_classes", "mean_images_per_class", "n_episodes"), s))
                     for s in settings],
        "sampler": asdict(config), "reads": results, "episode_assembly_one_thread": assembly,
        "provenance": provenance(cpu_count=os.cpu_count(), argv=sys.argv[1:],
                                 load_average_before=load_before, load_average_after=os.getloadavg()),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
