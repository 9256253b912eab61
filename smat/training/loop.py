"""`smat train`: episodic meta-training of SMAT, SoftMerge or PMF (METHOD §1.10-1.11, §2.3).

Each task picks a training domain uniformly, samples a variable-way variable-shot episode from its train
classes and loads it with train augmentation (support and query alike). Each task's loss / B is
back-propagated at once and the optimisers step every B tasks. After every epoch the model is validated
on fixed val episodes (sampled once per domain from its val classes with the training sampler's caps and
a seed independent of the training seed; eval mode, no inner step, test transform) and `best.pt` (best
mean val accuracy) and `last.pt` are written.

Products in OUT: `best.pt`, `train_log.jsonl` (one record per meta-update, per validation, per
gradient-alignment measurement; accuracies in %) and `expert_masks.npz` (SMAT with gates). During training they
are written under temporary names (`best.partial.pt`, `train_log.partial.jsonl`) and all of them are renamed to
their final names at the very end, `best.pt` last, so that a directory holding every final file holds a
finished model (`FINAL_FILES`). Besides them: `config.yaml` (resolved config), `val_episodes/{domain}.json`,
`summary.json` (run id, method, final progress and warnings; written just before the renames), `last.pt`, and
`resume.pt`, the periodic resume state (deleted at the end); after `kill -9` the same command continues from it
and ends with the same numbers as an uninterrupted run. A finished run re-invoked does nothing.

Under `torchrun --nproc-per-node N` the B tasks of a meta-batch are split over N processes whose gradients
are summed before the step (`smat.training.distributed`); every task draws its randomness from seeds of
(config seed, task index), so N processes train what one does, up to rounding (METHOD §11). Rank 0 alone
writes into OUT.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml

from smat.config_loader import load_config, to_dict
from smat.data.episodes import load_episode_file, make_sampler, write_episode_file
from smat.data.loader import EpisodeTensors, load_episode
from smat.data.store import Store
from smat.data.transforms import test_transform, train_transform
from smat.device import autocast, grad_scaler, set_matmul_precision
from smat.io import SmatError, atomic_open, read_json, sha256_file, stable_hash, write_json
from smat.methods.base import FewShotModel
from smat.methods.registry import build_model
from smat.models.pretrained import load_pretrained
from smat.progress import progress_bar
from smat.training import distributed
from smat.methods.checkpoint import save_model_checkpoint
from smat.training.resume import load_resume, restore_rng_state, rng_state, save_resume
from smat.training.config import TrainConfig
from smat.training.alignment_probe import gradient_alignment
from smat.training.optim import build_optimisers, set_epoch_lr, step

log = logging.getLogger(__name__)


def train(config_path: Path, stores: list[Path], pretrained: Path, out: Path, overrides: list[str] | None = None,
          device: str = "auto") -> None:
    config = load_config(TrainConfig, config_path, overrides)
    with distributed.process_group(device) as process_device:
        Trainer(config, stores, Path(pretrained), Path(out), process_device).run()


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


# The products of `smat train` (the outputs the workflow declares), in the order they are given their final names
# at the end: best.pt last. During training each is written under its temporary name (`partial_name`);
# expert_masks.npz is a product of models with gates only.
FINAL_FILES = ("expert_masks.npz", "train_log.jsonl", "best.pt")


def partial_name(name: str) -> str:
    """The name a product has until training ends: best.pt -> best.partial.pt."""
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.partial.{suffix}"


# How far above τ every expert must be, with λ at 0 for a whole epoch, for `smat train` to warn of collapsed gates.
GATE_OVERSHOOT = 0.05

# Tags the per-task seeds: (seed, task index) also seeds the gradient-alignment generators, which must differ.
TASK_STREAM = 0x7A5C
UPDATE_STREAM = 0x7A5D


def task_seeds(seed: int, task: int) -> tuple[int, int]:
    """(augmentation seed, forward seed) of the training task with global index `task`: functions of the config
    seed and the index alone, so that any number of processes draws what one process draws (METHOD §11)."""
    augment, forward = _stream_seeds(TASK_STREAM, seed, task, 2)
    return augment, forward


def update_seed(seed: int, first_task: int) -> int:
    """Seed of what a meta-update computes after its step (the gate samples of `end_update_`), from the config seed
    and the update's first task alone: the same in every process."""
    return _stream_seeds(UPDATE_STREAM, seed, first_task, 1)[0]


def _stream_seeds(stream: int, seed: int, index: int, n: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence([stream, seed, index]).generate_state(n, np.uint64) >> np.uint64(1)]


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generators (CPU and `device`), from which the router's relaxed-Bernoulli sample and the
    gate noise draw, seeded with `seed` for the block and restored after it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


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
        if config.meta_batch % (processes := distributed.world_size()):
            raise SmatError(f"meta_batch={config.meta_batch} is not divisible by the {processes} processes; start a "
                            "number of processes that divides it (torchrun --nproc-per-node), since each runs an "
                            "equal share of every meta-batch")
        self.main = distributed.is_main()           # rank 0: the only process that writes into OUT
        self.plain_config = json.loads(json.dumps(to_dict(config)))       # tuples -> lists, for YAML and JSON
        self.backbone_info = {"arch": meta["arch"], "image_size": backbone.image_size,
                              "pretrained_sha256": sha256_file(pretrained)}
        self.run_id = stable_hash({"config": self.plain_config, "backbone": self.backbone_info,
                                   "stores": [s.fingerprint for s in self.stores]})

        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.model = build_model(config, backbone).to(device)
        self.model.configure_training(config.optim)
        self.optimisers = build_optimisers(self.model, config.optim)
        self.trained = [p for opt in self.optimisers.all() for group in opt.param_groups for p in group["params"]]
        if config.compile:
            if device.type != "cuda":
                raise SmatError(f"compile=true: torch.compile of the backbone is for CUDA only (on {device.type} "
                                "it costs minutes of compilation for no gain); drop it or train on a GPU")
            self.model.backbone.compile()       # in place: functional_call and the state-dict keys are unchanged
        set_matmul_precision(device, config.tf32)
        self.amp = config.amp                   # fp16 | bf16 | off, resolved per device by smat.device
        self.scaler = grad_scaler(device, config.amp)
        self.samplers = [make_sampler(s, "train", config.sampler) for s in self.stores]
        self.sampler_rng = np.random.default_rng(config.seed)
        self.train_transform = train_transform(backbone.image_size, tuple(config.crop_scale))
        self.test_transform = test_transform(backbone.image_size)
        self.progress = {"epoch": 0, "task_in_epoch": 0, "tasks_seen": 0, "best_val_acc": None,
                         "best_epoch": None, "val_acc": None, "lambda_active_updates": 0, "warnings": []}
        self.log_offset = 0
        self.log_file = None
        self.last_sparsity: list[float] = []          # realised sparsity per expert at the latest meta-update
        self.paths = {name: out / name for name in
                      ("config.yaml", "resume.pt", "last.pt", "summary.json", *FINAL_FILES,
                       *map(partial_name, FINAL_FILES))}
        # Final file -> the file training writes it to: every product of this model (masks: with gates only).
        self.products = {name: self.paths[partial_name(name)] for name in FINAL_FILES
                         if name != "expert_masks.npz" or config.switches.mls}

    def finished(self) -> bool:
        """OUT holds a finished model: every final file of this model's method is there."""
        return all(self.paths[name].exists() for name in self.products)

    # --- run ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        if self.finished():
            summary = self.paths["summary.json"]
            if not summary.exists():
                raise SmatError(f"{self.out}: holds a finished model ({', '.join(self.products)}) but no summary.json "
                                "to tell which run made it; use another --out, or delete the directory to retrain")
            if read_json(summary).get("run_id") != self.run_id:
                raise SmatError(f"{self.out}: holds a finished run with a different config, data or backbone; "
                                "use another --out, or delete the directory to retrain")
            self._info("%s: already trained (%s exist); nothing to do", self.out, ", ".join(self.products))
            return
        if self._resumable():
            self._restore()
        else:
            self._start()
        distributed.barrier()                   # rank 0's config, val episodes and log are in place
        val_sets = self._val_sets()
        c = self.config
        total = c.epochs * c.tasks_per_epoch
        with self._log_writer(), progress_bar(total=total, initial=self.progress["tasks_seen"], unit="task",
                                              desc=f"train {c.method} -> {self.out.name}",
                                              disable=not self.main) as bar:
            last_save = (self.progress["tasks_seen"], time.monotonic())
            while self.progress["epoch"] < c.epochs:
                lrs = set_epoch_lr(self.optimisers, self.progress["epoch"], c.schedule)
                self.model.train()
                while self.progress["task_in_epoch"] < c.tasks_per_epoch:
                    metrics = self._meta_batch()
                    self.last_sparsity = metrics["sparsity"]
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
        """B tasks, each loss / B back-propagated at once, then one optimiser step (METHOD §1.10).

        With N processes each runs its B / N tasks and replays what the others' tasks change in the model,
        in task order; every process samples every episode, so the sampler's stream is the single-process one,
        and each task draws the rest of its randomness from its own seeds (METHOD §11).
        """
        c = self.config
        first = self.progress["tasks_seen"]
        mine = distributed.my_share(c.meta_batch)
        records, failure = [], None
        for offset in range(c.meta_batch):
            task = first + offset
            domain = int(self.sampler_rng.integers(len(self.stores)))
            episode = self.samplers[domain].sample(self.sampler_rng)
            augment_seed, forward_seed = task_seeds(c.seed, task)
            if offset not in mine:
                with seeded_global_rng(forward_seed, self.device), autocast(self.device, self.amp):
                    self.model.replay_task_state_()
                continue
            augment = torch.Generator(device=self.device).manual_seed(augment_seed)
            tensors = load_episode(self.stores[domain], episode, self.train_transform, augment).to(self.device)
            with seeded_global_rng(forward_seed, self.device), autocast(self.device, self.amp):
                loss, metrics = self.model.meta_loss(tensors, task)
            if not torch.isfinite(loss):
                failure = self._non_finite_message(loss.item(), task, domain)
                break
            self.scaler.scale(loss / c.meta_batch).backward()
            records.append({**metrics, "acc": 100.0 * metrics["acc"]})
        if failure is None and distributed.launcher_gone():
            failure = (f"{self.out}: the torchrun launcher of this run has ended (killed?), so all its processes "
                       "stop; run the same command again to resume")
        records = self._gather_task_records(records, failure)
        distributed.all_reduce_gradients(self.trained)
        grad_norms = {name: (norm if np.isfinite(norm) else None)      # an fp16 overflow step: skipped anyway
                      for name, norm in step(self.optimisers, self.scaler).items()}
        task_means = _mean_metrics(records)
        lrs = {group["name"]: group["lr"] for group in self.optimisers.sgd.param_groups}
        with seeded_global_rng(update_seed(c.seed, first), self.device):
            self.model.end_update_(task_means.get("alpha", []), lrs)
        self.progress["tasks_seen"] += c.meta_batch
        self.progress["task_in_epoch"] += c.meta_batch
        self.model.tasks_seen.fill_(self.progress["tasks_seen"])
        # The same keys for every method: the ones a method has no use for stay empty.
        metrics = {"temperature": None, "sparsity": [], "expected_density": [], "gate_band": [], "lambda": [],
                   "alpha": [], "alpha_entropy": None, **task_means, "grad_norm": grad_norms}
        if any(value > 0 for value in metrics["lambda"]):
            self.progress["lambda_active_updates"] = self.progress.get("lambda_active_updates", 0) + 1
            self.progress["lambda_active_in_epoch"] = True
        return metrics

    def _non_finite_message(self, loss: float, task: int, domain: int) -> str:
        resume = self.paths["resume.pt"]
        last = (f"The last good state is in {resume} and {self.paths['last.pt']}" if resume.exists()
                else "No state was saved")
        return (f"non-finite loss ({loss}) at task {task} (epoch {self.progress['epoch']}, domain "
                f"{self.stores[domain].domain!r}): training stopped. {last}; lower the learning rates (optim.*) "
                "or check the data")

    @staticmethod
    def _gather_task_records(records: list[dict], failure: str | None) -> list[dict]:
        """Every process's task metrics in task order; a non-finite loss anywhere stops every process alike."""
        shares = distributed.all_gather_objects((records, failure))
        if failures := [f for _, f in shares if f is not None]:
            raise SmatError(failures[0])        # the earliest task's: the shares are in task order
        return [record for share, _ in shares for record in share]

    def _maybe_grad_alignment(self) -> None:
        ga, n, b = self.config.grad_alignment, self.progress["tasks_seen"], self.config.meta_batch
        if not ga.interval or n // ga.interval == (n - b) // ga.interval or not self.main:
            return                  # rank 0 alone: the analysis only writes log records and changes nothing
        # Its own generators, so that the training run does not depend on the analysis (see alignment_probe.py).
        rng = np.random.default_rng([self.config.seed, n])
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed * 1_000_003 + n)
        domains = rng.permutation(len(self.stores))[:ga.max_domains]
        episodes = [load_episode(self.stores[d], self.samplers[d].sample(rng), self.train_transform,
                                 generator).to(self.device) for d in sorted(domains.tolist())]
        for record in gradient_alignment(self.model, episodes, n, ga.merged, self.device):
            self._write_log(record)

    def _check_gates(self, sparsity: list[float]) -> None:
        """Warn once per epoch when the constraint has let go: every expert sparser than τ + 0.05 while λ stayed
        0 for the whole epoch. Closed gates get no task gradient (METHOD §1.3), so such masks are frozen."""
        tau, epoch = self.config.tau, self.progress["epoch"]
        active = self.progress.pop("lambda_active_in_epoch", False)
        if not sparsity or active or min(sparsity) <= tau + GATE_OVERSHOOT:
            return
        message = (f"gates collapsed: every expert is sparser than tau={tau:g} + {GATE_OVERSHOOT:g} (realised "
                   f"sparsity {min(sparsity):.3f}-{max(sparsity):.3f}) and lambda stayed 0 for all of epoch {epoch}, "
                   "so the masks no longer move; lower optim.mask_lr or optim.lagrangian_lr (METHOD §1.13)")
        self.progress.setdefault("warnings", []).append(message)
        self._write_log({"kind": "warning", "epoch": epoch, "task": self.progress["tasks_seen"], "message": message})
        if self.main:
            log.warning("%s: %s", self.out, message)

    def _end_epoch(self, val_sets: dict[str, tuple[Store, list]]) -> None:
        epoch = self.progress["epoch"]
        self._check_gates(self.last_sparsity)
        if val_sets:
            per_domain = self._validate(val_sets)
            acc = float(np.mean(list(per_domain.values())))
            self._write_log({"kind": "val", "epoch": epoch, "task": self.progress["tasks_seen"], "acc": acc,
                             "per_domain": per_domain})
            self.progress["val_acc"] = acc
            if self.progress["best_val_acc"] is None or acc > self.progress["best_val_acc"]:
                self.progress.update(best_val_acc=acc, best_epoch=epoch)
                self._save_model(self.paths["best.partial.pt"])
        self._save_model(self.paths["last.pt"])
        self.progress.update(epoch=epoch + 1, task_in_epoch=0)

    def _validate(self, val_sets: dict[str, tuple[Store, list]]) -> dict[str, float]:
        """Mean accuracy per domain. With N processes each scores every N-th episode and every process gets all
        the scores, so that all select the same best model."""
        self.model.eval()
        rank, processes = distributed.rank(), distributed.world_size()

        def accuracy(store: Store, episode) -> float:
            return episode_accuracy(self.model, load_episode(store, episode, self.test_transform).to(self.device))

        with torch.no_grad(), autocast(self.device, self.amp):
            mine = {domain: {i: accuracy(store, episodes[i]) for i in range(rank, len(episodes), processes)}
                    for domain, (store, episodes) in val_sets.items()}
        self.model.train()
        shares = distributed.all_gather_objects(mine)
        per_domain = {}
        for domain, (_, episodes) in val_sets.items():
            scores = {i: acc for share in shares for i, acc in share[domain].items()}
            per_domain[domain] = float(np.mean([scores[i] for i in range(len(episodes))]))
        return per_domain

    def _finish(self) -> None:
        if not self.main:
            return
        if self.progress["best_epoch"] is None:         # no validation: the last model is the selected one
            self._save_model(self.paths["best.partial.pt"])
        if "expert_masks.npz" in self.products:
            masks = self.model.expert_masks()
            with atomic_open(self.paths["expert_masks.partial.npz"], "wb") as handle:
                np.savez_compressed(handle, **{name: m.cpu().numpy() for name, m in masks.items()})
        write_json(self.paths["summary.json"],
                   {"run_id": self.run_id, "method": self.config.method, **self.progress})
        # Every product is complete: rename each to its final name (atomic), best.pt last; only then does the
        # directory count as finished (`finished`), and only then is the resume state dropped.
        for name, partial in self.products.items():
            partial.replace(self.paths[name])
        self.paths["resume.pt"].unlink(missing_ok=True)
        self._info("%s: done; best mean val accuracy %s at epoch %s", self.out, self.progress["best_val_acc"],
                   self.progress["best_epoch"])

    # --- files --------------------------------------------------------------------------------------------

    def _info(self, message: str, *args) -> None:
        if self.main:
            log.info(message, *args)

    def _start(self) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.paths["config.yaml"], "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.plain_config, handle, sort_keys=False)
        if self.config.validation.episodes:
            for store in self.stores:
                write_val_episodes(store, self.config, self._val_path(store))
        self.paths["train_log.partial.jsonl"].write_text("", encoding="utf-8")

    def _val_path(self, store: Store) -> Path:
        return self.out / "val_episodes" / f"{store.domain}.json"

    def _val_sets(self) -> dict[str, tuple[Store, list]]:
        if not self.config.validation.episodes:
            return {}
        return {s.domain: (s, load_episode_file(self._val_path(s), s)[0]) for s in self.stores}

    @contextlib.contextmanager
    def _log_writer(self) -> Iterator[None]:
        """`train_log.jsonl` open for appending on rank 0; the other processes write no log."""
        if not self.main:
            yield
            return
        with open(self.paths["train_log.partial.jsonl"], "a", encoding="utf-8") as self.log_file:
            yield
        self.log_file = None

    def _write_log(self, record: dict) -> None:
        if self.log_file is None:
            return
        try:        # strict JSON: a non-finite number would write the non-standard token NaN or Infinity
            line = json.dumps(record, allow_nan=False)
        except ValueError as err:
            raise SmatError(f"{self.paths['train_log.partial.jsonl']}: a {record.get('kind')} record holds a "
                            f"non-finite number ({err}); training stopped") from err
        self.log_file.write(line + "\n")
        self.log_file.flush()
        self.log_offset = self.log_file.tell()

    def _checkpoint_due(self, last_task: int, last_time: float) -> bool:
        every = self.config.checkpoint
        return bool((every.every_tasks and self.progress["tasks_seen"] - last_task >= every.every_tasks)
                    or (every.every_seconds and time.monotonic() - last_time >= every.every_seconds))

    def _save_model(self, path: Path) -> None:
        if self.main:
            save_model_checkpoint(path, self.model, self.plain_config, self.backbone_info, dict(self.progress))

    def _save_resume(self) -> None:
        if not self.main:
            return
        save_resume(self.paths["resume.pt"], {
            "run_id": self.run_id, "model": self.model.state_dict(), "optimisers": self.optimisers.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(self.sampler_rng),
            "progress": dict(self.progress), "log_offset": self.log_offset})

    def _resumable(self) -> bool:
        """A resume state with its training log. A run cut off while renaming its products takes back the ones
        already renamed; one whose log went with them (Snakemake deletes a failed job's outputs) starts over."""
        if not self.paths["resume.pt"].exists():
            return False
        if self.main:
            for name, partial in self.products.items():
                if self.paths[name].exists() and not partial.exists():
                    self.paths[name].replace(partial)
        distributed.barrier()
        if self.paths["train_log.partial.jsonl"].exists():
            return True
        self._info("%s: %s has no training log to continue (train_log.partial.jsonl); starting over", self.out,
                   self.paths["resume.pt"])
        return False

    def _restore(self) -> None:
        state = load_resume(self.paths["resume.pt"])
        if state["run_id"] != self.run_id:
            raise SmatError(f"{self.paths['resume.pt']}: an unfinished run with a different config, data or "
                            "backbone; use another --out, or delete the directory to restart")
        self.model.load_state_dict(state["model"])
        self.optimisers.load_state_dict(state["optimisers"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"], self.sampler_rng)
        self.progress = state["progress"]
        self.log_offset = state["log_offset"]
        if self.main:
            with open(self.paths["train_log.partial.jsonl"], "r+b") as handle:  # drop records written after the save
                handle.truncate(self.log_offset)
        self._info("%s: resuming at task %d (epoch %d)", self.out, self.progress["tasks_seen"],
                   self.progress["epoch"])
