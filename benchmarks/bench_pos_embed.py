"""What the old position-table rule changed at 224 px, on a ViT-S/16 with random weights (METHOD §1.1).

Before: DINO's 14x14 table was resized to 8x8 once at load time (bicubic to the target size, no
antialiasing), and at 224 px timm's dynamic image size resized the 8x8 table back to 14x14 on every forward
(bicubic to the target size, timm's default antialiasing). Now: the 14x14 table is the parameter and every
forward at another size resamples it by the authors' rule (scale factor (n + 0.1) / N); at 224 px it is used
as it is. DINO's weights cannot be downloaded here, so the ViT-S/16 has random weights, with two tables:
timm's random initialisation (independent values per position: a worst case) and a smooth 2-D sine-cosine
table of the same scale (closer to a trained table). Records max and mean |Δ| of the effective 224-px table
(old vs native) and of the 224-px and 128-px CLS features of random images, old vs new path.

    python benchmarks/bench_pos_embed.py [--images 8] [--out benchmarks/results/pos_embed_rule.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from smat.io import provenance, write_json
from smat.models.backbones import create_backbone, resample_pos_embed_by_scale

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_small_patch16_dino"
NATIVE, RUN = 14, 8                      # DINO's grid at 224 px; the paper's grid at 128 px


def sincos_table(grid: int, dim: int, std: float) -> torch.Tensor:
    """(1, 1 + grid², dim) smooth 2-D sine-cosine table (MAE's construction), scaled to `std`; CLS row 0."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    table = torch.cat(parts, dim=1)
    table = table / table.std() * std
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).unsqueeze(0).float()


def old_backbone(weights: dict[str, torch.Tensor]):
    """The rule before this change: resized to 8x8 at load time, timm's dynamic size at other inputs."""
    backbone = create_backbone(ARCH, RUN * 16, dynamic_img_size=True).eval()
    table = resample_abs_pos_embed(weights["pos_embed"], new_size=[RUN, RUN], old_size=[NATIVE, NATIVE],
                                   num_prefix_tokens=1, antialias=False)
    backbone.vit.load_state_dict({**weights, "pos_embed": table})
    return backbone


def new_backbone(weights: dict[str, torch.Tensor]):
    """The rule now: the native table kept, resampled per forward by the authors' rule."""
    backbone = create_backbone(ARCH, RUN * 16, dynamic_img_size=True, grid=NATIVE).eval()
    backbone.vit.load_state_dict(weights)
    return backbone


def effective_table(backbone, grid: int) -> torch.Tensor:
    """The table a `grid`x`grid` input is given: `_pos_embed` of zero tokens with a zero CLS token."""
    vit = backbone.vit
    dim = vit.embed_dim
    with torch.no_grad():
        saved = vit.cls_token.detach().clone()
        vit.cls_token.zero_()
        table = vit._pos_embed(torch.zeros(1, grid, grid, dim))
        vit.cls_token.copy_(saved)
    return table


def stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "mean_abs_reference": float(b.abs().mean())}


def measure(weights: dict[str, torch.Tensor], images: int, seed: int) -> dict:
    old, new = old_backbone(weights), new_backbone(weights)
    native = weights["pos_embed"]
    new_table = effective_table(new, NATIVE)
    assert torch.equal(new_table, native), "the new path must use the native table as it is at 224 px"
    generator = torch.Generator().manual_seed(seed)
    out = {"table_224px_old_vs_native": stats(effective_table(old, NATIVE), native),
           "table_128px_old_vs_new": stats(effective_table(old, RUN),
                                           resample_pos_embed_by_scale(native, RUN, RUN))}
    for size in (224, 128):
        x = torch.randn(images, 3, size, size, generator=generator)
        with torch.no_grad():
            f_old, f_new = old(x), new(x)
        cosine = torch.nn.functional.cosine_similarity(f_old, f_new, dim=-1)
        out[f"cls_features_{size}px_old_vs_new"] = {**stats(f_old, f_new), "min_cosine": float(cosine.min())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pos_embed_rule.json")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    weights = {k: v.detach().clone() for k, v in create_backbone(ARCH, NATIVE * 16).vit.state_dict().items()}
    random_std = float(weights["pos_embed"][0, 1:].std())
    results = {"random_table": measure(weights, args.images, args.seed)}
    smooth = {**weights, "pos_embed": sincos_table(NATIVE, weights["pos_embed"].shape[-1], random_std)}
    results["sincos_table"] = measure(smooth, args.images, args.seed)
    for table, rows in results.items():
        for what, values in rows.items():
            print(f"{table:13s} {what:30s} " + "  ".join(f"{k} {v:.3g}" for k, v in values.items()))
    write_json(args.out, provenance(
        arch=ARCH, weights=f"random (timm init, torch.manual_seed({args.seed})); DINO's are not downloadable here",
        table_std=random_std, images=args.images,
        old_rule="14x14 -> 8x8 at load (bicubic to size, no antialias); 8x8 -> n x n per forward (timm dynamic size)",
        new_rule="14x14 kept; per forward bicubic, scale factor (n + 0.1) / 14; none at 224 px",
        results=results))


if __name__ == "__main__":
    main()
