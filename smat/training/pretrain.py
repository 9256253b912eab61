"""Pre-training of the tiny ViT for the embedded benchmark: the offline stand-in for DINO's θ_pre.

Objective: joint supervised classification over the union of the train classes of all given stores (the
embedded default: the pre-training corpus of textures, sketches, signs and fractals, disjoint from the
alphabets that meta-tuning sees, as ImageNet is for DINO) with a linear head on the CLS feature,
cross-entropy, AdamW, linear warm-up then cosine decay (per-step schedule), and progressive resizing: the
first `low_res_epochs` see 16-px crops (a quarter of the tokens, the position embeddings resampled on the
fly), the last ones full-size crops. Why this objective: it is
generic and, like DINO, not episodic, so the features are not tuned for few-shot episodes and meta-tuning
has something to add; and it learns useful features fastest within a CPU budget of minutes, where
self-supervised objectives need many more epochs. Why progressive
resizing: at equal CPU time it more than doubles the epochs: +9 points of few-shot accuracy (5 full-size
epochs vs the default 10 + 2, benchmarks/results/pretrain.json).

Only train classes are used: val classes select meta-tuning checkpoints and test classes are for
evaluation; a store without train classes (an OOD store) is refused.

Augmentation is the meta-tuning train transform (METHOD §1.11) with a milder crop scale for 32-px images.
Every random draw derives from `seed` and the step number (epoch permutation, per-step augmentation), so an
interrupted run resumed from `OUT.partial` ends with exactly the weights of an uninterrupted one.
Images of all train classes are held in memory (N x S x S x 3 bytes: 43 MB for the default benchmark).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smat.config_loader import check_ranges, load_config, to_dict
from smat.data.store import Store
from smat.data.transforms import train_transform
from smat.device import resolve_device
from smat.io import SmatError, atomic_path, first_nonfinite, load_torch_record, provenance, stable_hash
from smat.models.backbones import backbone_spec, create_backbone
from smat.models.pretrained import export_weights, save_checkpoint
from smat.progress import progress_bar

log = logging.getLogger(__name__)

PARTIAL_FORMAT = "smat-pretrain-partial/1"


@dataclasses.dataclass
class PretrainConfig:
    """The defaults are the embedded benchmark's recipe (config/pretrain/embedded.yaml states nothing else)."""

    arch: str = "vit_tiny_patch4_32"          # backbone to pre-train (smat.models.backbones.BACKBONES); the
                                              # workflow sets it from backbone.arch
    image_size: int = 32                      # training resolution; stores must hold images of this size
    epochs: int = 12                          # passes over all train images (the last partial batch is dropped)
    batch_size: int = 32                      # small batches, many steps: better features per CPU-second than 128
    lr: float = 1e-3                          # AdamW peak learning rate
    weight_decay: float = 0.05                # on weight matrices only (not norms, biases, tokens, pos_embed)
    warmup_epochs: float = 0.5                # linear warm-up, then cosine decay to 0, both per step
    label_smoothing: float = 0.0
    patch_drop_rate: float = 0.0              # fraction of patch tokens dropped per training image (speed)
    low_res_size: int | None = 16             # progressive resizing: the first low_res_epochs train on crops
    low_res_epochs: int = 10                  # shrunk to low_res_size px (4x fewer tokens, 3.7x the images per
                                              # second), then image_size
    grad_clip: float = 1.0                    # max global gradient norm; 0 = no clipping
    crop_scale: tuple[float, float] = (0.6, 1.0)   # RandomResizedCrop area range (small crops destroy 32-px glyphs)
    seed: int = 0
    checkpoint_every_steps: int = 200         # write OUT.partial every N steps ...
    checkpoint_every_seconds: float = 120.0   # ... or every N seconds, whichever comes first
    max_steps_per_run: int | None = None      # stop after N steps of this invocation (time-limited jobs); rerun

    def __post_init__(self) -> None:
        backbone_spec(self.arch)
        check_ranges(self, positive=("image_size", "lr"), seeds=("seed",),
                     non_negative=("weight_decay", "warmup_epochs", "grad_clip"),
                     fraction=("label_smoothing", "patch_drop_rate"))
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale {self.crop_scale}: expected 0 < low <= high <= 1")
        if self.checkpoint_every_steps < 1 or self.checkpoint_every_seconds <= 0:
            raise ValueError("checkpoint_every_steps must be >= 1 and checkpoint_every_seconds > 0")
        if self.low_res_epochs and not (self.low_res_size and 0 < self.low_res_size < self.image_size):
            raise ValueError(f"low_res_size {self.low_res_size}: expected a size between 1 and image_size "
                             f"({self.image_size}) when low_res_epochs ({self.low_res_epochs}) > 0")
        if not 0 <= self.low_res_epochs <= self.epochs:
            raise ValueError(f"low_res_epochs {self.low_res_epochs}: expected 0..epochs ({self.epochs})")
        if self.max_steps_per_run is not None and self.max_steps_per_run < 1:
            raise ValueError(f"max_steps_per_run {self.max_steps_per_run}: expected >= 1 or null")


# Settings that only control how a run is split and saved: they may change between resumed invocations.
_RUN_CONTROL = ("checkpoint_every_steps", "checkpoint_every_seconds", "max_steps_per_run")


@dataclasses.dataclass
class TrainSet:
    images: np.ndarray            # uint8 (N, S, S, 3), every train image of every store
    labels: np.ndarray            # int64 (N,), joint class index
    class_names: list[str]        # "domain/class" per joint class index
    stores: list[dict[str, Any]]  # what was read, for provenance


def pretrain(stores: list[Path], out: Path, config: str | None, overrides: list[str], device: str,
             weights_out: Path | None = None) -> None:
    """Pre-train `config.arch` on the train classes of `stores`; write a smat-backbone/1 checkpoint to `out`
    and, if asked, the bare weights as safetensors to `weights_out` (what `smat fetch` takes)."""
    cfg = load_config(PretrainConfig, config, overrides)
    out = Path(out)
    data = load_train_set([Path(s) for s in stores], cfg.image_size)
    dev = resolve_device(device)
    steps_per_epoch = len(data.labels) // cfg.batch_size
    if steps_per_epoch == 0:
        raise SmatError(f"only {len(data.labels)} train images, fewer than batch_size {cfg.batch_size}; "
                        "lower it with --set batch_size=N")
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))

    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.arch, cfg.image_size, patch_drop_rate=cfg.patch_drop_rate,
                               dynamic_img_size=cfg.low_res_epochs > 0)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, len(data.class_names))).to(dev)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
    run_key = stable_hash({"config": {k: v for k, v in to_dict(cfg).items() if k not in _RUN_CONTROL},
                           "stores": [s["fingerprint"] for s in data.stores]})
    partial = out.with_name(out.name + ".partial")
    step, seconds = _resume(partial, run_key, model, optimizer, scheduler)

    transform = train_transform(cfg.image_size, cfg.crop_scale)
    low_res_steps = cfg.low_res_epochs * steps_per_epoch
    labels = torch.from_numpy(data.labels)
    stop = total if cfg.max_steps_per_run is None else min(total, step + cfg.max_steps_per_run)
    started, last_save, last_step_saved = time.monotonic(), time.monotonic(), step
    model.train()
    progress = progress_bar(total=total, initial=step, desc=f"pretrain {cfg.arch}", unit="step")
    while step < stop:
        batch = _batch_indices(step, steps_per_epoch, cfg.batch_size, len(data.labels), cfg.seed)
        augment_seed, model_seed = _step_seeds(cfg.seed, step)
        generator = torch.Generator(dev).manual_seed(augment_seed)
        torch.manual_seed(model_seed)  # the global generator draws the dropped patch tokens
        x = transform(data.images[batch], generator)
        if step < low_res_steps:
            x = F.interpolate(x, size=cfg.low_res_size, mode="bilinear", align_corners=False, antialias=True)
        y = labels[batch].to(dev)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            _diverged(f"loss {loss.item()}", step, partial, last_step_saved, out, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        progress.update(1)
        if step % 10 == 0 or step == stop:
            accuracy = (logits.argmax(1) == y).float().mean().item()
            progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}",
                                 lr=f"{scheduler.get_last_lr()[0]:.1e}")
        due = (step - last_step_saved >= cfg.checkpoint_every_steps
               or time.monotonic() - last_save >= cfg.checkpoint_every_seconds)
        if (due or step == stop or step == total) and (bad := first_nonfinite(model.state_dict())):
            _diverged(f"tensor {bad}", step, partial, last_step_saved, out, cfg)
        if step < total and (due or step == stop):
            elapsed = seconds + time.monotonic() - started
            _save_partial(partial, run_key, step, elapsed, model, optimizer, scheduler)
            last_save, last_step_saved = time.monotonic(), step
    progress.close()
    seconds += time.monotonic() - started
    if step < total:
        log.info("stopped at step %d of %d (max_steps_per_run); rerun the same command to continue", step, total)
        return

    meta = {
        "image_size": cfg.image_size,
        "config": to_dict(cfg),
        "stores": data.stores,
        "n_classes": len(data.class_names),
        "n_images": len(data.labels),
        "steps": total,
        "last_loss": round(loss.item(), 4),
        "seconds": round(seconds, 1),
        "device": str(dev),
        "provenance": provenance(seed=cfg.seed, config_hash=run_key),
    }
    save_checkpoint(out, cfg.arch, backbone.vit.state_dict(), source="pretrain", sha256=None, meta=meta)
    if weights_out is not None:
        digest = export_weights(backbone.vit.state_dict(), weights_out)
        log.info("%s: weights as safetensors, sha256 %s", weights_out, digest)
    partial.unlink(missing_ok=True)
    log.info("%s: %s pre-trained on %d classes, %d images, %d steps in %.0f s", out, cfg.arch,
             len(data.class_names), len(data.labels), total, seconds)


def load_train_set(roots: list[Path], image_size: int) -> TrainSet:
    """Every image of every train class of the given stores, labelled by one joint class index."""
    if not roots:
        raise SmatError("no --store given: pass the ID dataset stores to pre-train on")
    images, labels, names, infos, seen = [], [], [], [], {}
    for root in roots:
        store = Store(root)
        if store.fingerprint in seen:
            raise SmatError(f"{root}: the same store as {seen[store.fingerprint]}; pass each store once")
        seen[store.fingerprint] = root
        train = store.class_ids("train")
        if not train:
            raise SmatError(f"{root}: domain {store.domain!r} has no train classes (an OOD store?); pre-training "
                            "uses only the train classes of in-domain stores, so leave this store out")
        if store.image_size != image_size:
            raise SmatError(f"{root}: images are {store.image_size} px but pre-training runs at {image_size} px; "
                            f"convert with --image-size {image_size} or set image_size={store.image_size}")
        n_images = 0
        for class_id in train:
            info = store.classes[class_id]
            images.append(store.images(class_id, range(info.n_images)))
            labels.append(np.full(info.n_images, len(names), dtype=np.int64))
            names.append(f"{store.domain}/{info.name}")
            n_images += info.n_images
        infos.append({"path": str(root), "domain": store.domain, "fingerprint": store.fingerprint,
                      "n_train_classes": len(train), "n_images": n_images})
    return TrainSet(np.concatenate(images), np.concatenate(labels), names, infos)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Standard ViT practice: no decay on norms, biases, the class token and position embeddings.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or name.endswith(("cls_token", "pos_embed")) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _step_seeds(seed: int, step: int) -> tuple[int, int]:
    augment, model = np.random.SeedSequence([seed, step]).generate_state(2)
    return int(augment), int(model)


def _batch_indices(step: int, steps_per_epoch: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return np.sort(order[position * batch_size:(position + 1) * batch_size])


def _save_partial(path: Path, run_key: str, step: int, seconds: float, model: nn.Module,
                  optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    state = {"format": PARTIAL_FORMAT, "run_key": run_key, "step": step, "seconds": seconds,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _diverged(what: str, step: int, partial: Path, last_step_saved: int, out: Path, cfg: PretrainConfig) -> None:
    """Stop a run whose loss or weights are NaN/inf: nothing is written, and the message says what to do."""
    last = f"the last good state is {partial} (step {last_step_saved})" if partial.exists() else "no state was saved"
    raise SmatError(f"pre-training diverged ({what} is not finite) at step {step}: stopped, nothing written to "
                    f"{out}; {last}. Lower lr (now {cfg.lr:g}) or raise warmup_epochs")


def _resume(path: Path, run_key: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> tuple[int, float]:
    """Restore the state saved in `path` if it exists; return (step, seconds spent so far)."""
    if not path.exists():
        return 0, 0.0
    state = load_torch_record(path, "pre-training resume state", PARTIAL_FORMAT, "delete it to start over")
    if state["run_key"] != run_key:
        raise SmatError(f"{path}: written by a run with other settings or stores; rerun with the same ones, "
                        "or delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("%s: resuming at step %d", path, state["step"])
    return state["step"], state["seconds"]
