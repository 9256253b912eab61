"""Normalised backbone checkpoints: fetch once (hub name, URL or local file), verify, load offline.

A checkpoint file is `{"format": "smat-backbone/1", "arch", "state_dict", "source", "sha256", "meta"}` with
the weights in timm's naming at the grid they were trained at. `fetch` is the only code that touches the
network; everything else reads the file it wrote, so compute nodes never download (METHOD §7.12).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from smat.io import (SmatError, atomic_path, brief_error, first_nonfinite, load_torch, load_torch_record,
                     scratch_dir, sha256_file)
from smat.models.backbones import BACKBONES, Backbone, backbone_spec, create_backbone
from smat.models.dino_keys import convert_to_timm
from smat.progress import progress_bar

log = logging.getLogger(__name__)

FORMAT = "smat-backbone/1"
_HUB_NAME = re.compile(r"^(hf-hub:)?[\w.-]+/[\w.-]+$")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl")


def fetch(source: str, out: Path, sha256: str | None = None, arch: str | None = None) -> None:
    """Fetch weights from `source`, verify their sha256, convert to timm naming and write `out` atomically.

    `source`: an http(s):// or file:// URL, a local file, or a Hugging Face hub name ("timm/...",
    "hf-hub:facebook/dino-vits16"). `sha256` (else the registry's pinned digest for that URL, if any) is
    checked against the fetched file. `arch` defaults to the registry entry of `source`, else is inferred
    from the tensor shapes.
    """
    out = Path(out)
    if arch is not None:
        backbone_spec(arch)  # fail before downloading
    known_arch, pinned = _registry_source(source)
    arch = arch or known_arch
    expected = (sha256 or pinned or "").lower() or None
    # Downloads go next to `out` (cluster /tmp is often small) and vanish with the folder.
    with scratch_dir(out) as tmp:
        path = _obtain(source, tmp, arch)
        digest = sha256_file(path)
        if expected and digest != expected:
            raise SmatError(f"{source}: sha256 mismatch: expected {expected}, got {digest}. The file is "
                            f"corrupt or not the one intended; nothing was written to {out}")
        state_dict, notes = convert_to_timm(_read_weights(path, source))
    if not state_dict:
        raise SmatError(f"{source}: no weight tensors found (expected a ViT state dict)")
    arch = arch or _infer_arch(state_dict, source)
    problems = _mismatches(state_dict, arch)
    if problems:
        raise SmatError(f"{source}: weights do not fit backbone {arch}: " + "; ".join(problems))
    spec = backbone_spec(arch)
    grid = _grid(state_dict["pos_embed"].shape[1], source)
    meta = {**notes, "image_size": grid * spec["patch_size"]}
    save_checkpoint(out, arch, state_dict, source=source, sha256=digest, meta=meta)
    log.info("%s: %s from %s (sha256 %s)", out, arch, source, digest)


def save_checkpoint(out: Path, arch: str, state_dict: dict[str, torch.Tensor], source: str, sha256: str | None,
                    meta: dict[str, Any]) -> None:
    # meta goes through JSON so that the file holds plain types only (readable with weights_only=True).
    record = {"format": FORMAT, "arch": arch, "state_dict": {k: v.detach().cpu().clone()
                                                             for k, v in state_dict.items()},
              "source": source, "sha256": sha256, "meta": json.loads(json.dumps(meta))}
    with atomic_path(out) as tmp:
        torch.save(record, tmp)


def export_weights(state_dict: dict[str, torch.Tensor], out: Path) -> str:
    """Write bare backbone weights as safetensors, the format of a committed backbone (config/pretrained/):
    no pickle, no timestamps, so equal weights give equal bytes. Returns the file's sha256."""
    from safetensors.torch import save_file

    with atomic_path(Path(out)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))
    return sha256_file(Path(out))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint record, validated: a dict in FORMAT with a known arch."""
    record = load_torch_record(path, "backbone checkpoint", FORMAT,
                               f"create one with `smat fetch` or `smat pretrain`; convert raw weights with "
                               f"`smat fetch {path} --out NEW.pt`")
    if bad := first_nonfinite(record.get("state_dict") or {}):
        raise SmatError(f"{path}: tensor {bad} holds NaN or infinity; the run that wrote it diverged. Recreate "
                        "it (e.g. `smat pretrain` with a lower lr)")
    if record.get("arch") not in BACKBONES:
        raise SmatError(f"{path}: unknown backbone {record.get('arch')!r}; "
                        f"known backbones: {', '.join(BACKBONES)}")
    return record


def load_pretrained(path: Path, image_size: int | None = None) -> tuple[Backbone, dict[str, Any]]:
    """Build the checkpoint's backbone for `image_size` (default: the registry's) and load its weights.

    The position table stays at the grid the weights were trained at. When that grid is not `image_size`'s
    (DINO's 14x14 at 224 px, run at 128 px), the backbone resamples it on every forward by the authors' rule
    (bicubic, scale factor (n + 0.1) / N; METHOD §1.1, §10), so Pre at 224 px uses DINO's table as it is and
    SMAT gates and merges the native table. Returns (backbone, record without the state dict).
    """
    record = read_checkpoint(path)
    state_dict = dict(record["state_dict"])
    table = state_dict.get("pos_embed")
    grid = _grid(table.shape[1], path) if torch.is_tensor(table) and table.dim() == 3 else None  # else: named below
    # Dynamic size: the same outputs at `image_size`, and other sizes resample the table per forward (for
    # evaluation at 224 px, METHOD §3.4).
    backbone = create_backbone(record["arch"], image_size, dynamic_img_size=True, grid=grid)
    native = grid * backbone_spec(record["arch"])["patch_size"] if grid else backbone.image_size
    problems = _mismatches(state_dict, record["arch"], image_size=native)
    if problems:
        raise SmatError(f"{path}: weights do not fit backbone {record['arch']}: " + "; ".join(problems))
    backbone.vit.load_state_dict(state_dict, strict=True)
    return backbone, {k: v for k, v in record.items() if k != "state_dict"}


def _registry_source(source: str) -> tuple[str | None, str | None]:
    """(arch, pinned sha256) when `source` is one of the registry's default weights, else (None, None)."""
    name = source.removeprefix("hf-hub:")
    for arch, spec in BACKBONES.items():
        weights = spec["weights"] or {}
        if weights.get("url") == source:
            return arch, weights.get("sha256")
        if name in (weights.get("hub"), weights.get("hf", "").removeprefix("hf-hub:")):
            return arch, None
    return None, None


def _obtain(source: str, tmp: Path, arch: str | None) -> Path:
    """A local path holding the bytes of `source` (downloaded into `tmp` when remote)."""
    if source.startswith(("http://", "https://", "file://")):
        return _download(source, tmp / Path(source.split("?")[0]).name, arch)
    if Path(source).exists():
        if not Path(source).is_file():
            raise SmatError(f"{source}: is a directory; pass the weights file inside it")
        return Path(source)
    looks_local = source.startswith((".", "/", "~")) or Path(source).suffix in _WEIGHT_SUFFIXES
    if looks_local:        # e.g. weights/dino.pth: a mistyped path, not a hub repository to try for 30 s
        raise SmatError(f"{source}: no such file (from {Path.cwd()}); check the path")
    if _HUB_NAME.match(source):
        return _hub_download(source.removeprefix("hf-hub:"), arch)
    raise SmatError(f"{source}: no such file, and not a URL or a hub name like 'timm/vit_small_patch16_224.dino'")


def _download(url: str, dest: Path, arch: str | None) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(dest, "wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"fetch {dest.name}") as bar:
                while block := response.read(1 << 20):
                    handle.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as err:
        raise SmatError(_manual_hint(url, url, arch, err)) from None
    return dest


def _hub_download(repo_id: str, arch: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    urls = " or ".join(f"https://huggingface.co/{repo_id}/resolve/main/{f}" for f in _HUB_FILES)
    for filename in _HUB_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError as err:  # offline and not in the local hub cache
            raise SmatError(_manual_hint(f"hub model {repo_id}", urls, arch, err)) from None
        except EntryNotFoundError:  # online, but the repository stores its weights under the other name
            continue
        except (HfHubHTTPError, OSError) as err:
            raise SmatError(_manual_hint(f"hub model {repo_id}", urls, arch, err)) from None
    raise SmatError(f"hub model {repo_id}: none of {', '.join(_HUB_FILES)} exists in the repository")


def _manual_hint(what: str, url: str, arch: str | None, err: Exception) -> str:
    hint = (f"{what}: cannot download ({err}).\nOn a machine with internet, download\n  {url}\n"
            f"then copy the file here and run\n  smat fetch /path/to/FILE --arch {arch or 'ARCH'} --out OUT.pt")
    return hint if arch else hint + f"\n(ARCH is one of {', '.join(BACKBONES)})"


def _read_weights(path: Path, source: str) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise SmatError(f"{source}: not a readable safetensors file ({brief_error(err)})") from None
    import argparse

    # DINO training checkpoints also pickle their argparse.Namespace; nothing else beyond tensors is allowed.
    return load_torch(path, "PyTorch weights file", "expected .pth/.pt/.bin or .safetensors",
                      allowed=(argparse.Namespace,), name=source)


def table_grid(table: Any) -> int | None:
    """The side g of a (1, 1 + g², dim) position table; None for anything else (the shape checks name it)."""
    if not torch.is_tensor(table) or table.dim() != 3 or table.shape[1] < 2:
        return None
    grid = math.isqrt(table.shape[1] - 1)
    return grid if grid * grid + 1 == table.shape[1] else None


def _grid(n_tokens: int, where: Any) -> int:
    grid = round((n_tokens - 1) ** 0.5)
    if grid * grid != n_tokens - 1:
        raise SmatError(f"{where}: pos_embed has {n_tokens} tokens, not 1 + a square grid")
    return grid


def _mismatches(state_dict: dict[str, torch.Tensor], arch: str, image_size: int | None = None) -> list[str]:
    """Missing, unexpected, wrongly shaped and non-float keys against `arch` (pos_embed length only with
    `image_size`); load_state_dict would cast integer tensors silently."""
    expected = _expected_shapes(arch, image_size)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    not_float = sorted(f"{key} ({getattr(value, 'dtype', type(value).__name__)})" for key, value in state_dict.items()
                       if key in expected and not (torch.is_tensor(value) and value.is_floating_point()))
    wrong_shape = []
    for key in sorted(set(expected) & set(state_dict)):
        if not torch.is_tensor(state_dict[key]):
            continue
        shape, want = tuple(state_dict[key].shape), tuple(expected[key])
        if key == "pos_embed" and image_size is None:
            shape, want = shape[::2], want[::2]  # any grid: it is resampled per forward
        if shape != want:
            wrong_shape.append(f"{key} {tuple(state_dict[key].shape)} instead of {tuple(expected[key])}")
    return [f"{what} ({len(items)}): {_first(items)}" for what, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape),
             ("not floating-point tensors", not_float)) if items]


@functools.lru_cache(maxsize=None)
def _expected_shapes(arch: str, image_size: int | None) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory
        return {k: v.shape for k, v in create_backbone(arch, image_size).vit.state_dict().items()}


def _first(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _infer_arch(state_dict: dict[str, torch.Tensor], source: str) -> str:
    fits = [name for name in BACKBONES if not _mismatches(state_dict, name)]
    if len(fits) != 1:
        raise SmatError(f"{source}: cannot tell the architecture from the weights "
                        f"({'several fit: ' + ', '.join(fits) if fits else 'none of the known backbones fits'}); "
                        f"pass --arch, one of {', '.join(BACKBONES)}")
    return fits[0]
