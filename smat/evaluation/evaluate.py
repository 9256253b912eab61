"""`smat evaluate`: score a model on frozen episodes, without fine-tuning or with full / LoRA fine-tuning.

Per episode (METHOD §3.4): the task weights from the support (SMAT: eval-mode masks and router scores, no
inner step), optional fine-tuning on the support (METHOD §3.5), then cosine-prototype logits of the query.
Every episode has its own seed, derived from its index and the episode file's seed, so fine-tuning and
augmentation noise are reproducible and independent of which other episodes are evaluated. Fine-tuned
episodes run in batches (`smat.evaluation.finetune`); each row's `seconds` is then its batch's time shared
equally.
Pre and PMF without fine-tuning embed each distinct image once (`FeatureCache`); the `seconds` of their
rows then include an equal share of that embedding time.
One call may evaluate several datasets (`evaluate_many`): the model is loaded once, which saves the
workflow a process start and a model load per dataset.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import smat
from smat.device import resolve_device
from smat.evaluation.batching import CPU_BUDGET, CUDA_MAX_EPISODES, BatchBudget, measure_cuda_budget, plan_batches
from smat.evaluation.feature_cache import CHUNK, FeatureCache
from smat.evaluation.finetune import FINETUNE_STEPS, Finetuner, Task
from smat.evaluation.modes import FINETUNE_MODES, NO_FINETUNING
from smat.evaluation.results import write_results
from smat.io import SmatError, check_unchanged, provenance, read_json, sha256_file, stable_hash
from smat.methods.registry import PRETRAINED_PREFIX, SWITCH_NAMES, display_name, sparsity_and_experts
from smat.progress import progress_bar

log = logging.getLogger(__name__)



def episode_seed(index: int, file_seed: int) -> int:
    """Seed of episode `index`: a stable hash of (index, the episode file's seed)."""
    return int(stable_hash([int(index), int(file_seed)]), 16)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seed torch's global RNGs for one episode (for anything in a model that draws from them) and restore
    them afterwards; yield a CPU generator with the same seed for fine-tuning (augmentation, LoRA)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def _chunked(features, x: Tensor) -> Tensor:
    """`features(x)` in chunks of CHUNK images (bounded memory for support/query sets of up to 500)."""
    return torch.cat([features(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])


def _score(model, support_f: Tensor, support_y: Tensor, query_f: Tensor, query_y: Tensor,
           n_way: int) -> tuple[float, float]:
    """(accuracy %, loss) of the query set; both NaN when a logit is not finite (argmax would pick a class)."""
    with torch.inference_mode():
        logits = model.head_logits(support_f, support_y, query_f, n_way)
        if not torch.isfinite(logits).all():
            return math.nan, math.nan
        loss = F.cross_entropy(logits, query_y).item()
        accuracy = 100.0 * (logits.argmax(-1) == query_y).float().mean().item()
    return accuracy, loss


class EpisodeRunner:
    """Evaluates one model on episodes of one store with one fine-tuning mode.

    Without fine-tuning (or at lr 0) episodes run one at a time, Pre and PMF from the feature cache; with it,
    many episodes are fine-tuned in one batch (`smat.evaluation.finetune`, bounds in `batching`), with the
    same results as one at a time. `use_cache=False` turns the feature cache off (for benchmarks and tests:
    the results are the same); `steps` is the number of fine-tuning steps (METHOD §3.5: 50); `budget` fixes
    the batch bounds (default: `CPU_BUDGET` on the CPU, measured on CUDA).
    """

    def __init__(self, model, store, finetune: str, device: torch.device, use_cache: bool = True,
                 steps: int = FINETUNE_STEPS, budget: BatchBudget | None = None) -> None:
        from smat.data.transforms import test_transform

        if finetune not in FINETUNE_MODES:
            raise SmatError(f"--finetune {finetune!r}: choose one of {', '.join(FINETUNE_MODES)}")
        self.model, self.store, self.finetune, self.device = model, store, finetune, device
        self.use_cache, self.steps = use_cache, steps
        self.image_size = model.backbone.image_size
        self.transform = test_transform(self.image_size)
        self.finetuner = Finetuner(model, finetune, steps) if finetune != NO_FINETUNING else None
        # Batch bounds by image size, shared by the runners of `on_store` (measured once per size on CUDA).
        self.budgets: dict[int, BatchBudget] = {}
        fixed = budget or (CPU_BUDGET if device.type != "cuda" else None)
        self.fixed_budget = dataclasses.replace(fixed) if fixed else None     # lowered on out-of-memory

    def on_store(self, store, image_size: int | None = None) -> "EpisodeRunner":
        """This runner on another store, at `image_size` px (default: the model's), sharing the model, the
        fine-tuning copy of its backbone and the batch bounds. The backbone resamples its position table to
        other sizes."""
        from smat.data.transforms import test_transform

        runner = copy.copy(self)
        runner.store = store
        runner.image_size = image_size or self.model.backbone.image_size
        runner.transform = test_transform(runner.image_size)
        return runner

    def budget_record(self) -> dict | None:
        """The fine-tuning batch bounds used so far, for the provenance; None without fine-tuning."""
        if self.finetuner is None:
            return None
        return {str(size): budget.record() for size, budget in sorted(self.budgets.items())} or (
            {"bounds": self.fixed_budget.record()} if self.fixed_budget else None)

    def uses_cache(self, lr: float) -> bool:
        """Task-independent features and no fine-tuning (lr 0 is no fine-tuning): embed every image once."""
        return self.use_cache and self.model.task_independent and (self.finetune == NO_FINETUNING or lr == 0)

    def run(self, episodes: Sequence, indices: Sequence[int], file_seed: int, lr: float,
            progress: bool = True, desc: str = "episodes") -> list[dict[str, Any]]:
        """One result dict per episode: ways, sizes, accuracy (%), loss, seconds, alpha."""
        return self.run_lrs(episodes, indices, file_seed, [lr], progress, desc)[0]

    def run_lrs(self, episodes: Sequence, indices: Sequence[int], file_seed: int, lrs: Sequence[float],
                progress: bool = True, desc: str = "episodes") -> list[list[dict[str, Any]]]:
        """`run` at every lr of `lrs`; the fine-tuning of all (lr, episode) pairs is batched together."""
        indices = list(indices)
        tuned = [lr for lr in lrs if self.finetune != NO_FINETUNING and lr != 0]
        rows = self._finetuned(episodes, indices, file_seed, tuned, progress, desc) if tuned else {}
        return [[rows[(lr, i)] for i in range(len(episodes))] if lr in tuned
                else self._untuned(episodes, indices, file_seed, lr, progress, desc) for lr in lrs]

    def _untuned(self, episodes, indices, file_seed: int, lr: float, progress: bool, desc: str) -> list[dict]:
        """Episodes one at a time without fine-tuning; Pre and PMF from the feature cache."""
        cache = None
        shared_seconds = 0.0
        if self.uses_cache(lr):
            start = time.perf_counter()
            weights = self._task_params(self._load(episodes[0])).weights    # the same for every task
            cache = FeatureCache.build(lambda x: self.model.features(weights, x), self.store, episodes,
                                       self.transform, self.device, progress=progress)
            shared_seconds = (time.perf_counter() - start) / len(episodes)
        results = []
        for index, episode in zip(progress_bar(indices, desc=desc, unit="episode", disable=not progress), episodes):
            start = time.perf_counter()
            with seeded(episode_seed(index, file_seed), self.device):
                if cache is not None:
                    accuracy, loss = _score(self.model, *cache.lookup(episode), len(episode.classes))
                    alpha = None
                else:
                    accuracy, loss, alpha = self._run_untuned(episode)
            results.append(_row(index, episode, accuracy, loss, time.perf_counter() - start + shared_seconds, alpha))
        return results

    def _finetuned(self, episodes, indices, file_seed: int, lrs: list[float], progress: bool,
                   desc: str) -> dict[tuple[float, int], dict]:
        """{(lr, position): row} of every episode fine-tuned at every lr of `lrs`, in batches of (lr, episode)
        pairs; each pair draws from its episode's seed, so every lr sees the same noise (paired scores)."""
        pairs = [(lr, i) for lr in lrs for i in range(len(episodes))]
        sizes = [sum(len(ids) for ids in episodes[i].support) for _, i in pairs]
        budget = self._budget(episodes, indices, file_seed, lrs[0], max(sizes))
        rows: dict[tuple[float, int], dict] = {}
        bar = progress_bar(total=len(pairs), desc=desc, unit="episode", disable=not progress)
        pending = [[pairs[k] for k in batch] for batch in plan_batches(sizes, budget)]
        while pending:
            batch = pending.pop(0)
            start = time.perf_counter()
            try:
                results = self._run_batch(episodes, indices, file_seed, batch)
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    raise
                torch.cuda.empty_cache()     # split the batch; results do not depend on the batching
                half = len(batch) // 2
                budget.episodes = half
                pending[:0] = [batch[:half], batch[half:]]
                continue
            seconds = (time.perf_counter() - start) / len(batch)
            for (lr, i), (accuracy, loss, alpha) in zip(batch, results):
                rows[(lr, i)] = _row(indices[i], episodes[i], accuracy, loss, seconds, alpha)
            bar.update(len(batch))
        bar.close()
        return rows

    def _run_batch(self, episodes, indices, file_seed: int, batch: list[tuple[float, int]]) -> list[tuple]:
        """(accuracy, loss, router scores) of each (lr, position) pair of one batch."""
        loaded: dict[int, tuple] = {}
        tasks = []
        for lr, i in batch:
            if i not in loaded:
                seed = episode_seed(indices[i], file_seed)
                with seeded(seed, self.device):
                    tensors = self._load(episodes[i])
                    loaded[i] = (tensors, self._task_params(tensors), seed)
            tensors, params, seed = loaded[i]
            tasks.append(Task(params.weights, tensors, lr, torch.Generator().manual_seed(seed)))
        scores = self.finetuner.run(tasks)
        return [(*score, _alpha(loaded[i][1])) for score, (_, i) in zip(scores, batch)]

    def _budget(self, episodes, indices, file_seed: int, lr: float, support_size: int) -> BatchBudget:
        """The batch bounds at this runner's image size: fixed, or measured once on CUDA with copies of the
        largest episode."""
        if self.fixed_budget is not None:
            return self.fixed_budget
        if self.image_size not in self.budgets:
            largest = max(range(len(episodes)), key=lambda i: sum(len(ids) for ids in episodes[i].support))
            self.budgets[self.image_size] = measure_cuda_budget(
                lambda n: self._try_copies(episodes, indices, file_seed, lr, largest, n), support_size,
                limit=CUDA_MAX_EPISODES)
            log.info("fine-tuning batch bounds at %d px: %s", self.image_size, self.budgets[self.image_size])
        return self.budgets[self.image_size]

    def _try_copies(self, episodes, indices, file_seed: int, lr: float, i: int, n: int) -> None:
        """One fine-tuning step of n copies of episode i (the CUDA memory probe)."""
        steps, self.finetuner.steps = self.finetuner.steps, 1
        try:
            self._run_batch(episodes, indices, file_seed, [(lr, i)] * n)
        finally:
            self.finetuner.steps = steps

    def _load(self, episode):
        from smat.data.loader import load_episode

        return load_episode(self.store, episode, self.transform).to(self.device)

    def _task_params(self, tensors):
        with torch.inference_mode():
            return self.model.task_params(tensors.support_x, tensors.support_y)

    def _run_untuned(self, episode) -> tuple[float, float, list | None]:
        """(accuracy %, loss, router scores) of one episode without fine-tuning."""
        tensors = self._load(episode)
        params = self._task_params(tensors)
        features = lambda x: self.model.features(params.weights, x)  # noqa: E731
        with torch.inference_mode():
            support_f, query_f = _chunked(features, tensors.support_x), _chunked(features, tensors.query_x)
        accuracy, loss = _score(self.model, support_f, tensors.support_y, query_f, tensors.query_y, tensors.n_way)
        return accuracy, loss, _alpha(params)


def _alpha(params) -> list | None:
    return None if params.alpha is None else [float(a) for a in params.alpha.flatten().tolist()]


def _row(index: int, episode, accuracy: float, loss: float, seconds: float, alpha) -> dict[str, Any]:
    return {
        "episode": index,
        "ways": len(episode.classes),
        "support_size": sum(len(ids) for ids in episode.support),
        "query_size": sum(len(ids) for ids in episode.query),
        "accuracy": accuracy,
        "loss": loss,
        "seconds": seconds,
        "alpha": alpha,
    }


def model_file(model_spec: str) -> Path:
    """The file behind a model spec: a checkpoint path, or FILE of `pretrained:FILE`."""
    path = Path(model_spec[len(PRETRAINED_PREFIX):] if model_spec.startswith(PRETRAINED_PREFIX) else model_spec)
    if not path.is_file():
        raise SmatError(f"--model {model_spec}: file {path} not found")
    return path


def load_model_with_info(model_spec: str, device: torch.device, sha: str | None = None):
    """(model in eval mode, its identity and Table 2 switches for the result rows; empty switches for Pre).

    The identity is the file's sha256 taken before loading (`sha`, if the caller hashed it already), checked
    again after loading: the weights loaded are those of the recorded hash."""
    from smat.methods.checkpoint import load_model, load_trained

    path = model_file(model_spec)
    sha = sha or sha256_file(path)
    if model_spec.startswith(PRETRAINED_PREFIX):
        model, config = load_model(model_spec, device), None
    else:
        model, checkpoint = load_trained(path, device)
        config = checkpoint["config"]
    check_unchanged(path, sha, "model file")
    info: dict[str, Any] = {"method": model.method, "model_id": f"{model.method}-{sha[:12]}",
                            "model_sha256": sha, **{name: None for name in SWITCH_NAMES}, "tau": None,
                            "experts": None}
    if config is None:
        info["config_hash"] = stable_hash({"method": model.method, "pretrained_sha256": sha})
    else:
        switches = config.get("switches") or {}
        info.update({name: switches.get(name) for name in SWITCH_NAMES})
        tau, experts = sparsity_and_experts(config)
        info.update(tau=tau, experts=experts, config_hash=stable_hash(config))
    return model, info


def resolve_lr(finetune: str, lr: float | None, lr_from: Path | None, dataset: str,
               model_sha256: str | None = None) -> float:
    """The fine-tuning lr: --lr, or best_lr of a `smat select-lr` file for this dataset, mode and model (by its
    sha256, when given); 0 for none."""
    if lr is not None and lr_from is not None:
        raise SmatError("give either --lr or --lr-from, not both")
    if finetune == NO_FINETUNING:
        if lr is not None or lr_from is not None:
            raise SmatError("--lr/--lr-from need --finetune full or lora; --finetune none does not fine-tune")
        return 0.0
    if lr is None and lr_from is None:
        raise SmatError(f"--finetune {finetune} needs a learning rate: --lr X, or --lr-from LR.json "
                        f"written by `smat select-lr`")
    if lr_from is not None:
        record = read_json(lr_from)
        for key, expected in (("dataset", dataset), ("finetune", finetune)):
            if record.get(key) != expected:
                raise SmatError(f"{lr_from}: {key} is {record.get(key)!r} but this evaluation is on {key} "
                                f"{expected!r}; use the lr file selected for it")
        chosen_for = str(record.get("model_id", "")).rpartition("-")[2]
        if model_sha256 and chosen_for and chosen_for != model_sha256[:len(chosen_for)]:
            raise SmatError(f"{lr_from}: selected for model {record.get('model_id')}, not for this model "
                            f"(sha256 {model_sha256[:12]}); run `smat select-lr` for it")
        lr = record.get("best_lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise SmatError(f"{lr_from}: best_lr {lr!r} is not a number")
    if not math.isfinite(lr) or lr < 0:
        raise SmatError(f"learning rate {lr!r}: must be a finite number >= 0 (0 = no fine-tuning)")
    return float(lr)


def load_episodes(episodes_path: Path, store, limit: int | None) -> tuple[list, dict]:
    """The first `limit` episodes of a frozen episode file (its store fingerprint checked) and its metadata."""
    from smat.data.episodes import load_episode_file

    if limit is not None and limit < 1:
        raise SmatError(f"--limit {limit}: must be at least 1")
    episodes, meta = load_episode_file(Path(episodes_path), store)
    if not episodes:
        raise SmatError(f"{episodes_path}: contains no episodes")
    return (episodes[:limit] if limit is not None else episodes), meta


@dataclass
class DatasetRun:
    """One dataset of a call: its store, its frozen episodes (checked against the store), where results go."""
    store: Any
    episodes: list
    meta: dict
    episodes_path: Path
    out: Path
    image_size: int | None = None     # evaluation input size; None: the model's


def read_datasets(episodes_paths: Sequence, store_paths: Sequence, outs: Sequence,
                  limit: int | None, image_sizes: Sequence[int | None] = (None,)) -> list[DatasetRun]:
    """The datasets of `--episodes/--store/--out` (and `--image-size`, once or per dataset), which pair up by
    position, all read and checked up front; each store is opened with `verify` (its pixels are checked against
    the manifest's class hashes as they are read)."""
    from smat.data.store import Store

    if not len(episodes_paths) == len(store_paths) == len(outs):
        raise SmatError(f"--episodes, --store and --out pair up by position, one of each per dataset, but got "
                        f"{len(episodes_paths)} --episodes, {len(store_paths)} --store and {len(outs)} --out")
    if not outs:
        raise SmatError("--episodes: give at least one episode file")
    seen = set()
    for out in outs:
        if os.path.abspath(out) in seen:
            raise SmatError(f"--out {out} is given twice: every dataset needs its own output file")
        seen.add(os.path.abspath(out))
    if len(image_sizes) not in (1, len(outs)):
        raise SmatError(f"--image-size: given {len(image_sizes)} times for {len(outs)} datasets; give it once or "
                        "once per dataset, in the same order")
    if bad := [s for s in image_sizes if s is not None and s < 1]:
        raise SmatError(f"--image-size {bad[0]}: must be a positive number of pixels (or 'model')")
    sizes = list(image_sizes) * len(outs) if len(image_sizes) == 1 else list(image_sizes)
    runs = []
    for episodes_path, store_path, out, size in zip(episodes_paths, store_paths, outs, sizes):
        store = Store(Path(store_path), verify=True)
        runs.append(DatasetRun(store, *load_episodes(Path(episodes_path), store, limit), Path(episodes_path),
                               Path(out), size))
    return runs


def input_hashes(run: DatasetRun, info: dict[str, Any]) -> dict[str, str]:
    """What a result read, each hashed when it was read: the episode file (the bytes parsed), the model file
    (before loading, checked after) and the store (its manifest's self-hash, which covers the class hashes)."""
    return {"episodes_sha256": run.meta["file_sha256"], "model_sha256": info["model_sha256"],
            "store_manifest_sha256": run.store.manifest["manifest_sha256"]}


def check_image_sizes(model, runs: Sequence[DatasetRun]) -> None:
    """Every evaluation size is a whole number of the backbone's patches."""
    patch = model.backbone.vit.patch_embed.patch_size[0]
    for run in runs:
        if run.image_size and run.image_size % patch:
            raise SmatError(f"--image-size {run.image_size} for {run.store.domain}: not a multiple of the "
                            f"backbone's {patch}-px patches")


def evaluate(model_spec: str, episodes_path: Path, store_path: Path, finetune: str = NO_FINETUNING,
             lr: float | None = None, lr_from: Path | None = None, label: str | None = None,
             limit: int | None = None, out: Path = Path("eval.csv"), device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Evaluate `model_spec` on the frozen episodes; write OUT.csv (one row per episode) and OUT.json.

    Nothing is written unless every episode succeeds. Returns the summary (mean, ci95, n, ...).
    """
    return evaluate_many(model_spec, [episodes_path], [store_path], [out], finetune=finetune, lr=lr,
                         lr_froms=[lr_from] if lr_from else None, label=label, limit=limit, device=device,
                         progress=progress)[0]


def evaluate_many(model_spec: str, episodes_paths: Sequence[Path], store_paths: Sequence[Path],
                  outs: Sequence[Path], finetune: str = NO_FINETUNING, lr: float | None = None,
                  lr_froms: Sequence[Path] | None = None, label: str | None = None, limit: int | None = None,
                  device: str = "auto", progress: bool = True,
                  image_sizes: Sequence[int | None] = (None,)) -> list[dict[str, Any]]:
    """`evaluate` on each (episodes, store) pair in turn with the model loaded once: pair i writes outs[i]
    exactly as `evaluate` would, with lr_froms[i] as its lr file. Returns the summaries, in the same order.

    Every input (model file, stores, episode files and their fingerprints, lr files) is checked before the
    model is loaded, so a bad one fails at once; each dataset's files are written when its episodes are done.
    """
    if finetune not in FINETUNE_MODES:
        raise SmatError(f"--finetune {finetune!r}: choose one of {', '.join(FINETUNE_MODES)}")
    if lr_froms is not None and len(lr_froms) != len(episodes_paths):
        raise SmatError(f"--lr-from: got {len(lr_froms)} file(s) for {len(episodes_paths)} --episodes; give one "
                        f"lr file per dataset, in the same order")
    model_file(model_spec)     # a missing model fails before the datasets are read
    torch_device = resolve_device(device)
    runs = read_datasets(episodes_paths, store_paths, outs, limit, image_sizes)
    model_sha = sha256_file(model_file(model_spec))    # checks lr files before the model loads; hashed once
    lrs = [resolve_lr(finetune, lr, Path(lr_froms[i]) if lr_froms else None, run.store.domain, model_sha)
           for i, run in enumerate(runs)]
    model, info = load_model_with_info(model_spec, torch_device, model_sha)
    check_image_sizes(model, runs)
    runner = EpisodeRunner(model, runs[0].store, finetune, torch_device)
    return [_evaluate_one(runner.on_store(run.store, run.image_size), run, model_spec, info, run_lr, label,
                          progress) for run, run_lr in zip(runs, lrs)]


def _evaluate_one(runner: EpisodeRunner, run: DatasetRun, model_spec: str, info: dict[str, Any], lr: float,
                  label: str | None, progress: bool) -> dict[str, Any]:
    """Run one dataset's episodes and write its OUT.csv and OUT.json; return the summary."""
    method, store, finetune = runner.model.method, run.store, runner.finetune
    results = runner.run(run.episodes, range(len(run.episodes)), int(run.meta.get("seed", 0)), lr,
                         progress=progress, desc=f"{display_name(method)} {store.domain} {finetune}")
    fixed = {
        "label": label or display_name(method),
        **{key: info[key] for key in ("model_id", "method", "mls", "meta", "dt", "ie", "tau", "experts",
                                      "config_hash")},
        "dataset": store.domain, "finetune": finetune, "lr": lr, "smat_version": smat.__version__,
    }
    if diverged := [r["episode"] for r in results if math.isnan(r["accuracy"])]:
        raise SmatError(f"{model_spec}: non-finite logits on {store.domain} episode(s) {diverged[:5]} "
                        f"(finetune {finetune}, lr {lr:g}); nothing was written. Fine-tuning diverged: use a "
                        f"smaller lr (or the one `smat select-lr` chose)")
    rows = [{**fixed, **result} for result in results]
    summary = write_results(rows, run.out, extra={
        "model": model_spec,
        "episodes_file": str(run.episodes_path),
        "provenance": provenance(
            **input_hashes(run, info),
            store_fingerprint=store.fingerprint, episodes_seed=run.meta.get("seed"), device=str(runner.device),
            image_size=run.image_size or runner.model.backbone.image_size,
            finetune_batch=runner.budget_record()),
    })
    log.info("%s: %s on %s (%s): %.2f ± %s over %d episodes", run.out, fixed["label"], store.domain, finetune,
             summary["mean"], "n/a" if summary["ci95"] is None else f"{summary['ci95']:.2f}", summary["n"])
    return summary
