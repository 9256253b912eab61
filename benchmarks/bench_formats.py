"""Conversion and read throughput of the Meta-Dataset formats, and the disk the paper configuration needs.

Writes a synthetic domain (JPEG images of the source size, as the official TFRecords and PMF's h5 files hold
them) in both formats, converts each into a store at 128 and at 224 px (`smat data convert`), then reads
random episode-sized batches from the stores. Prints and records images/s; the conversion with 1 and with
`--workers` decoding processes (TFRecords, 128 px; the stores must be identical) and the ImageNet time it
projects; also the store size of every dataset of config/paper.yaml from the published image counts.

    python benchmarks/bench_formats.py [--images 2000] [--workers 2] [--out benchmarks/results/formats.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_formats import example, flat_spec, tfrecord  # noqa: E402  (the fixtures' writers)

from smat.data.meta_dataset import convert_meta_dataset  # noqa: E402
from smat.data.store import Store  # noqa: E402
from smat.io import write_json  # noqa: E402

# Images per dataset as the paper configuration stores them: Meta-Dataset's published counts (all splits),
# the test sets of CIFAR, MNIST, Food-101, Pets and Cars, and all of DomainNet Sketch / Clipart.
PUBLISHED_IMAGES = {
    "ilsvrc_2012": 1_281_167, "omniglot": 32_460, "aircraft": 10_000, "cu_birds": 11_788, "dtd": 5_640,
    "quickdraw": 50_426_266, "fungi": 89_760, "vgg_flower": 8_189, "traffic_sign": 39_209, "mscoco": 152_374,
    "cifar10": 10_000, "cifar100": 10_000, "mnist": 10_000, "sketch": 70_386, "clipart": 48_837,
    "food101": 25_250, "pets": 3_669, "cars": 8_041,
}
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "mnist": 28}     # stored as they come (image_size: null)


def synthetic_domain(root: Path, kind: str, n_images: int, size: int) -> Path:
    n_classes = 20
    per_class = n_images // n_classes
    spec = flat_spec("bench", {"TRAIN": n_classes, "VALID": 0, "TEST": 0}, images=per_class)
    root.mkdir(parents=True)
    (root / "dataset_spec.json").write_text(json.dumps(spec))
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        pixels = [rng.integers(0, 256, (size, size + size // 4, 3), dtype=np.uint8) for _ in range(per_class)]
        if kind == "tfrecords":
            blobs = []
            for p in pixels:
                buffer = io.BytesIO()
                Image.fromarray(p).save(buffer, format="JPEG", quality=90)
                blobs.append(example(buffer.getvalue(), c))
            (root / f"{c}.tfrecords").write_bytes(tfrecord(blobs))
        else:
            with h5py.File(root / f"{c}.h5", "w") as handle:
                for j, p in enumerate(pixels):
                    handle.create_group(str(j))["image"] = p
    return root


def random_reads(store: Store, batches: int = 200, batch: int = 100) -> float:
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    for _ in range(batches):
        c = int(rng.integers(len(store.classes)))
        ids = rng.choice(store.classes[c].n_images, size=min(batch, store.classes[c].n_images), replace=False)
        store.images(c, np.sort(ids))
    return batches * batch / (time.perf_counter() - start)


def h5_random_reads(src: Path, batches: int = 50, batch: int = 100) -> float:
    """Reading PMF's h5 files in place, as its loader does (one file per class, one group per image), without
    the resize to the model size that would still follow: the alternative to a store."""
    rng = np.random.default_rng(1)
    files = sorted(src.glob("*.h5"))
    start = time.perf_counter()
    for _ in range(batches):
        with h5py.File(files[int(rng.integers(len(files)))], "r") as handle:
            for j in rng.choice(len(handle), size=min(batch, len(handle)), replace=False):
                np.asarray(handle[str(j)]["image"])
    return batches * batch / (time.perf_counter() - start)


def paper_disk() -> dict:
    config = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    sizes = {}
    for name, dataset in config["datasets"].items():
        side = dataset.get("image_size") or NATIVE_SIZE[name]
        sizes[name] = {"images": PUBLISHED_IMAGES[name], "px": side,
                       "gb": round(PUBLISHED_IMAGES[name] * side * side * 3 / 1e9, 2)}
    return {"datasets": sizes, "total_gb": round(sum(s["gb"] for s in sizes.values()), 1)}


def parallel_conversion(tmp: Path, n_images: int, workers: int) -> dict:
    """TFRecords at 128 px, converted with one decoding process and with `workers`: rates, speed-up, whether
    the two stores' pixels are the same bytes, and ImageNet's conversion time at each rate."""
    src = synthetic_domain(tmp / "parallel", "tfrecords", n_images, int(128 * 1.15))
    rates, pixels = {}, {}
    for n in (1, workers):
        out = tmp / f"parallel-store-{n}"
        start = time.perf_counter()
        convert_meta_dataset(src, out, "tfrecords", image_size=128, workers=n)
        rates[n] = n_images / (time.perf_counter() - start)
        pixels[n] = (out / "images.npy").read_bytes()
    imagenet = PUBLISHED_IMAGES["ilsvrc_2012"]
    result = {"workers": workers, "img_per_s": {str(n): round(r, 1) for n, r in rates.items()},
              "speedup": round(rates[workers] / rates[1], 2), "identical_pixels": pixels[1] == pixels[workers],
              "imagenet_minutes": {str(n): round(imagenet / r / 60, 1) for n, r in rates.items()}}
    print(f"tfrecords 128 px with {workers} workers: {result['speedup']}x one process "
          f"({result['img_per_s']}), identical pixels: {result['identical_pixels']}; ImageNet "
          f"{result['imagenet_minutes']} min")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "formats.json"))
    args = parser.parse_args()
    results = {"images": args.images, "conversion": {}, "random_read": {}, "h5_in_place_read": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("tfrecords", "pmf-h5"):
            for size in (128, 224):
                src = synthetic_domain(Path(tmp) / f"{kind}-{size}", kind, args.images, int(size * 1.15))
                start = time.perf_counter()
                store = convert_meta_dataset(src, Path(tmp) / f"store-{kind}-{size}", kind, image_size=size)
                rate = args.images / (time.perf_counter() - start)
                results["conversion"][f"{kind} {size}px"] = round(rate, 1)
                results["random_read"][f"{size}px"] = round(random_reads(store), 1)
                if kind == "pmf-h5":
                    results["h5_in_place_read"][f"{size}px"] = round(h5_random_reads(src), 1)
                    print(f"pmf-h5 read in place, {size} px source: {results['h5_in_place_read'][f'{size}px']} img/s")
                print(f"{kind:9s} {size} px: convert {rate:7.1f} img/s, random reads "
                      f"{results['random_read'][f'{size}px']:9.1f} img/s")
        results["workers"] = parallel_conversion(Path(tmp), args.images, args.workers)
    results["paper_disk"] = paper_disk()
    print(f"paper configuration: {results['paper_disk']['total_gb']} GB of stores")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
