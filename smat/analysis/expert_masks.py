"""Read `expert_masks.npz` (written by `smat train`): per backbone parameter, bool (M, *shape), True where
expert m's eval-mode gate is non-zero (METHOD §5.3–5.5). A model checkpoint (`smat train`'s best.pt, or an
imported release of `smat import smat-official`) gives the same masks from its gates, with no training: the
paper's Fig. 5 panels from the authors' own weights."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from smat.io import SmatError


def masks_of_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], float]:
    """(eval-mode masks, τ) of a gated model checkpoint."""
    from smat.methods.checkpoint import load_trained

    model, checkpoint = load_trained(path, "cpu")
    masks = model.expert_masks()
    if masks is None:
        raise SmatError(f"{path}: a {model.method} model without gates has no expert masks")
    return {name: mask.numpy() for name, mask in masks.items()}, float(checkpoint["config"]["tau"])


def read_expert_masks(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise SmatError(f"{path}: expert masks not found")
    if path.suffix in (".pt", ".pth"):
        return masks_of_checkpoint(path)[0]
    if not zipfile.is_zipfile(path):
        raise SmatError(f"{path}: not a .npz archive; expected the expert_masks.npz written by `smat train`")
    try:
        with np.load(path, allow_pickle=False) as archive:
            masks = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise SmatError(f"{path}: not a .npz of plain bool arrays ({err})") from None
    if not masks:
        raise SmatError(f"{path}: no masks inside; expected one bool array (M, *shape) per parameter")
    n_experts = {name: mask.shape[0] if mask.ndim else None for name, mask in masks.items()}
    if len(set(n_experts.values())) != 1 or None in n_experts.values():
        raise SmatError(f"{path}: every mask must have the same leading dimension M (experts); found "
                        + ", ".join(f"{n}: {m}" for n, m in list(n_experts.items())[:6]))
    for name, mask in masks.items():
        if mask.dtype != bool:
            if not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
                raise SmatError(f"{path}: mask {name!r} has dtype {mask.dtype}; expected bool (gate > 0)")
            masks[name] = mask.astype(bool)
    return masks
