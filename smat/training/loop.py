"""`smat train`: episodic meta-training of SMAT, SoftMerge or PMF (METHOD §1.10-1.11, §2.3).

Each task picks a training domain uniformly, samples a variable-way variable-shot episode from its train
classes and loads it with train augmentation (support and query alike). Each task's loss / B is
back-propagated at once and the optimisers step every B tasks. After every epoch the model is validated
on fixed val episodes (sampled once per domain from its val classes with the training sampler's caps and
a seed independent of the training seed; eval mode, no inner step, test transform) and `best.pt` (best
mean val accuracy) and `last.pt` are written.

Outputs in OUT: `config.yaml` (resolved config), `val_episodes/{domain}.json`, `train_log.jsonl` (one
record per meta-update, per validation, per gradient-alignment measurement; accuracies in %), `best.pt`,
`last.pt`, `expert_masks.npz` (SMAT with gates), and `DONE` (a JSON summary) once everything is written.
`resume.pt` holds the periodic resume state; after `kill -9` the same command continues from it and ends
with the same numbers as an uninterrupted run. A finished run re-invoked does nothing.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from smat.config import load_config, to_dict
from smat.data.episodes import load_episode_file, make_sampler, write_episode_file
from smat.data.loader import EpisodeTensors, load_episode
from smat.data.store import Store
from smat.data.transforms import test_transform, train_transform
from smat.device import autocast, resolve_device
from smat.io import SmatError, atomic_open, read_json, sha256_file, stable_hash, write_json
from smat.methods.base import FewShotModel
from smat.methods.registry import build_model
from smat.models.checkpoint import load_pretrained
from smat.progress import progress_bar
from smat.training.checkpointing import (load_resume, restore_rng_state, rng_state, save_model_checkpoint,
                                         save_resume)
from smat.training.config import TrainConfig
from smat.training.grad_alignment import gradient_alignment
from smat.training.optim import build_optimisers, set_epoch_lr, step

log = logging.getLogger(__name__)


def train(config_path: Path, stores: list[Path], pretrained: Path, out: Path, overrides: list[str] | None = None,
          device: str = "auto") -> None:
    config = load_config(TrainConfig, config_path, overrides)
    Trainer(config, stores, Path(pretrained), Path(out), resolve_device(device)).run()


def open_stores(paths: list[Path]) -> list[Store]:
    stores = [Store(p) for p in paths]
    for store in stores:
        if not store.class_ids("train"):
            raise SmatError(f"{store.root}: store {store.domain!r} has no train classes; meta-training needs "
                            "ID stores with a train split (convert with --role id or a splits file)")
    domains = [s.domain for s in stores]
    if len(set(domains)) != len(domains):
        raise SmatError(f"--store: the same domain appears twice ({', '.join(domains)}); pass each store once")
    return stores


def write_val_episodes(store: Store, config: TrainConfig, out: Path) -> None:
    """Freeze the val episodes of one domain (episode-file format), drawn with the training sampler's caps."""
    sampler = make_sampler(store, "val", config.sampler)
    rng = np.random.default_rng(config.validation.seed)
    episodes = [sampler.sample(rng) for _ in range(config.validation.episodes)]
    write_episode_file(out, store, "val", config.validation.seed, sampler, episodes)


def episode_accuracy(model: FewShotModel, episode: EpisodeTensors) -> float:
    """Query accuracy (%) of the eval-mode model on one episode: task weights, features, cosine head."""
    weights = model.task_params(episode.support_x, episode.support_y).weights
    logits = model.head_logits(model.features(weights, episode.support_x), episode.support_y,
                               model.features(weights, episode.query_x), episode.n_way)
    return 100.0 * (logits.argmax(-1) == episode.query_y).float().mean().item()


def _mean_metrics(records: list[dict]) -> dict:
    """Element-wise mean of the numbers and number lists of several tasks' metrics."""
    return {key: np.mean([r[key] for r in records], axis=0).tolist() for key in records[0]}


class Trainer:
    def __init__(self, config: TrainConfig, store_paths: list[Path], pretrained: Path, out: Path,
                 device: torch.device) -> None:
        self.config, self.out, self.device = config, out, device
        self.stores = open_stores(store_paths)
        backbone, meta = load_pretrained(pretrained, config.image_size)
        if config.validation.episodes and (no_val := [s.domain for s in self.stores if not s.class_ids("val")]):
            raise SmatError(f"--store: {', '.join(no_val)} has no val classes, which validation needs; pass ID stores "
                            "with a val split, or --set validation.episodes=0 to select the last model")
        if config.tasks_per_epoch % config.meta_batch:
            raise SmatError(f"tasks_per_epoch={config.tasks_per_epoch} is not a multiple of meta_batch="
                            f"{config.meta_batch}; every epoch must end with an optimiser step")
        self.plain_config = json.loads(json.dumps(to_dict(config)))       # tuples -> lists, for YAML and JSON
        self.backbone_info = {"arch": meta["arch"], "image_size": backbone.image_size,
                              "pretrained_sha256": sha256_file(pretrained)}
        self.run_id = stable_hash({"config": self.plain_config, "backbone": self.backbone_info,
                                   "stores": [s.fingerprint for s in self.stores]})

        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.model = build_model(config, backbone).to(device)
        self.optimisers = build_optimisers(self.model, config.optim)
        self.amp = config.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        self.samplers = [make_sampler(s, "train", config.sampler) for s in self.stores]
        self.sampler_rng = np.random.default_rng(config.seed)
        self.augment = torch.Generator(device=device).manual_seed(config.seed)
        self.train_transform = train_transform(backbone.image_size, tuple(config.crop_scale))
        self.test_transform = test_transform(backbone.image_size)
        self.progress = {"epoch": 0, "task_in_epoch": 0, "tasks_seen": 0, "best_val_acc": None,
                         "best_epoch": None, "val_acc": None}
        self.log_offset = 0
        self.paths = {name: out / name for name in
                      ("config.yaml", "train_log.jsonl", "resume.pt", "best.pt", "last.pt", "expert_masks.npz",
                       "DONE")}

    # --- run ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        done = self.paths["DONE"]
        if done.exists():
            if read_json(done).get("run_id") != self.run_id:
                raise SmatError(f"{self.out}: holds a finished run with a different config, data or backbone; "
                                "use another --out, or delete the directory to retrain")
            log.info("%s: already trained (DONE exists); nothing to do", self.out)
            return
        if self.paths["resume.pt"].exists():
            self._restore()
        else:
            self._start()
        val_sets = self._val_sets()
        c = self.config
        total = c.epochs * c.tasks_per_epoch
        with open(self.paths["train_log.jsonl"], "a", encoding="utf-8") as self.log_file, \
                progress_bar(total=total, initial=self.progress["tasks_seen"], unit="task",
                     desc=f"train {c.method} -> {self.out.name}") as bar:
            last_save = (self.progress["tasks_seen"], time.monotonic())
            while self.progress["epoch"] < c.epochs:
                lrs = set_epoch_lr(self.optimisers, self.progress["epoch"], c.schedule)
                self.model.train()
                while self.progress["task_in_epoch"] < c.tasks_per_epoch:
                    metrics = self._meta_batch()
                    bar.update(c.meta_batch)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.1f}")
                    self._write_log({"kind": "train", "task": self.progress["tasks_seen"],
                                     "epoch": self.progress["epoch"], **metrics, "lr": lrs})
                    self._maybe_grad_alignment()
                    if self._checkpoint_due(*last_save):
                        self._save_resume()
                        last_save = (self.progress["tasks_seen"], time.monotonic())
                self._end_epoch(val_sets)
                self._save_resume()
                last_save = (self.progress["tasks_seen"], time.monotonic())
        self._finish()

    def _meta_batch(self) -> dict:
        """B tasks, each loss / B back-propagated at once, then one optimiser step (METHOD §1.10)."""
        records = []
        for _ in range(self.config.meta_batch):
            domain = int(self.sampler_rng.integers(len(self.stores)))
            episode = self.samplers[domain].sample(self.sampler_rng)
            tensors = load_episode(self.stores[domain], episode, self.train_transform, self.augment).to(self.device)
            with autocast(self.device, self.amp):
                loss, metrics = self.model.meta_loss(tensors, self.progress["tasks_seen"])
            if not torch.isfinite(loss):
                resume = self.paths["resume.pt"]
                last = (f"The last good state is in {resume} and {self.paths['last.pt']}" if resume.exists()
                        else "No state was saved")
                raise SmatError(
                    f"non-finite loss ({loss.item()}) at task {self.progress['tasks_seen']} (epoch "
                    f"{self.progress['epoch']}, domain {self.stores[domain].domain!r}): training stopped. {last}; "
                    "lower the learning rates (optim.*) or check the data")
            self.scaler.scale(loss / self.config.meta_batch).backward()
            self.progress["tasks_seen"] += 1
            self.progress["task_in_epoch"] += 1
            self.model.tasks_seen.fill_(self.progress["tasks_seen"])
            records.append({**metrics, "acc": 100.0 * metrics["acc"]})
        step(self.optimisers, self.scaler)
        # The same keys for every method: the ones a method has no use for stay empty.
        return {"temperature": None, "sparsity": [], "lambda": [], "alpha": [], **_mean_metrics(records)}

    def _maybe_grad_alignment(self) -> None:
        ga, n, b = self.config.grad_alignment, self.progress["tasks_seen"], self.config.meta_batch
        if not ga.interval or n // ga.interval == (n - b) // ga.interval:
            return
        # Its own generators, so that the training run does not depend on the analysis (see grad_alignment.py).
        rng = np.random.default_rng([self.config.seed, n])
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed * 1_000_003 + n)
        domains = rng.permutation(len(self.stores))[:ga.max_domains]
        episodes = [load_episode(self.stores[d], self.samplers[d].sample(rng), self.train_transform,
                                 generator).to(self.device) for d in sorted(domains.tolist())]
        for record in gradient_alignment(self.model, episodes, n, ga.merged, self.device):
            self._write_log(record)

    def _end_epoch(self, val_sets: dict[str, tuple[Store, list]]) -> None:
        epoch = self.progress["epoch"]
        if val_sets:
            per_domain = self._validate(val_sets)
            acc = float(np.mean(list(per_domain.values())))
            self._write_log({"kind": "val", "epoch": epoch, "task": self.progress["tasks_seen"], "acc": acc,
                             "per_domain": per_domain})
            self.progress["val_acc"] = acc
            if self.progress["best_val_acc"] is None or acc > self.progress["best_val_acc"]:
                self.progress.update(best_val_acc=acc, best_epoch=epoch)
                self._save_model(self.paths["best.pt"])
        self._save_model(self.paths["last.pt"])
        self.progress.update(epoch=epoch + 1, task_in_epoch=0)

    def _validate(self, val_sets: dict[str, tuple[Store, list]]) -> dict[str, float]:
        self.model.eval()
        per_domain = {}
        with torch.no_grad(), autocast(self.device, self.amp):
            for domain, (store, episodes) in val_sets.items():
                accs = [episode_accuracy(self.model, load_episode(store, e, self.test_transform).to(self.device))
                        for e in episodes]
                per_domain[domain] = float(np.mean(accs))
        self.model.train()
        return per_domain

    def _finish(self) -> None:
        if self.progress["best_epoch"] is None:         # no validation: the last model is the selected one
            self._save_model(self.paths["best.pt"])
        masks = self.model.expert_masks() if hasattr(self.model, "expert_masks") else None
        if masks is not None:
            with atomic_open(self.paths["expert_masks.npz"], "wb") as handle:
                np.savez_compressed(handle, **{name: m.cpu().numpy() for name, m in masks.items()})
        write_json(self.paths["DONE"], {"run_id": self.run_id, "method": self.config.method, **self.progress})
        self.paths["resume.pt"].unlink(missing_ok=True)
        log.info("%s: done; best mean val accuracy %s at epoch %s", self.out, self.progress["best_val_acc"],
                 self.progress["best_epoch"])

    # --- files --------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.paths["config.yaml"], "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.plain_config, handle, sort_keys=False)
        if self.config.validation.episodes:
            for store in self.stores:
                write_val_episodes(store, self.config, self._val_path(store))
        self.paths["train_log.jsonl"].write_text("", encoding="utf-8")

    def _val_path(self, store: Store) -> Path:
        return self.out / "val_episodes" / f"{store.domain}.json"

    def _val_sets(self) -> dict[str, tuple[Store, list]]:
        if not self.config.validation.episodes:
            return {}
        return {s.domain: (s, load_episode_file(self._val_path(s), s)[0]) for s in self.stores}

    def _write_log(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        self.log_offset = self.log_file.tell()

    def _checkpoint_due(self, last_task: int, last_time: float) -> bool:
        every = self.config.checkpoint
        return bool((every.every_tasks and self.progress["tasks_seen"] - last_task >= every.every_tasks)
                    or (every.every_seconds and time.monotonic() - last_time >= every.every_seconds))

    def _save_model(self, path: Path) -> None:
        save_model_checkpoint(path, self.model, self.plain_config, self.backbone_info, dict(self.progress))

    def _save_resume(self) -> None:
        save_resume(self.paths["resume.pt"], {
            "run_id": self.run_id, "model": self.model.state_dict(), "optimisers": self.optimisers.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(self.sampler_rng, self.augment),
            "progress": dict(self.progress), "log_offset": self.log_offset})

    def _restore(self) -> None:
        state = load_resume(self.paths["resume.pt"])
        if state["run_id"] != self.run_id:
            raise SmatError(f"{self.paths['resume.pt']}: an unfinished run with a different config, data or "
                            "backbone; use another --out, or delete the directory to restart")
        self.model.load_state_dict(state["model"])
        self.optimisers.load_state_dict(state["optimisers"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"], self.sampler_rng, self.augment)
        self.progress = state["progress"]
        self.log_offset = state["log_offset"]
        with open(self.paths["train_log.jsonl"], "r+b") as handle:     # drop records written after the save
            handle.truncate(self.log_offset)
        log.info("%s: resuming at task %d (epoch %d)", self.out, self.progress["tasks_seen"], self.progress["epoch"])
