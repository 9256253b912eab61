"""Import the authors' released checkpoints as this project's model checkpoints (`smat import`, METHOD §10).

Two formats, both converted into a self-describing "smat-model/1" file that `smat evaluate --model` reads:

* **SMAT** (github szc12153/sparse_interpolated_experts, `checkpoint.pt`): the `state_dict()` of the official
  `SparseInterpolatedExperts`, bare or under `"model"`. θ_pre is `net.encoder.*` in transformers-4.30.2
  `ViTModel` naming (separate query/key/value, LayerNorm eps 1e-12, METHOD §1.1); δ and log α are
  `delta_hypernet.phis.{i}` and `mask_hypernet.log_alphas.{i}`, indexed by the backbone's parameter order, log α
  with the expert axis last (METHOD §1.2); the zero placeholder `net.head.weight` is dropped (METHOD §1.6). The
  router block `mask_hypernet.task_embed_agg.*` has old-style spectral norm (`weight_orig`, `weight_u`,
  `weight_v`, METHOD §1.4.3); `mask_sparsity_targets` is τ per expert, `num_metaupdates` the task counter of the
  router temperature (METHOD §1.4.7). The router keys and skill tokens were never registered (METHOD §7.1)
  and are not in the file: they come from `--router-extra`.
* **PMF** (github hushell/pmf_cvpr22, `checkpoint.pth` / `best.pth`): `{"model": ProtoNet state dict, "args":
  argparse.Namespace, ...}` with `scale_cls`, `bias` and `backbone.*` in DINO/timm naming, eps 1e-6
  (METHOD §2.3).

The imported backbone keeps the position table at the grid it was trained at and resamples it on every
forward as the authors' code does (`smat.models.backbones.AuthorsPosEmbedViT`).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smat.config_loader import to_dict
from smat.io import SmatError, load_torch, sha256_file
from smat.methods.base import backbone_parameters
from smat.methods.checkpoint import MODEL_FORMAT, save_model_checkpoint
from smat.methods.config import ModelConfig, RouterConfig
from smat.methods.pmf import PMF
from smat.methods.registry import build_model
from smat.methods.smat import SMAT
from smat.models.backbones import BACKBONES, POS_EMBED_PER_FORWARD, backbone_spec, create_backbone
from smat.models.dino_keys import convert_to_timm
from smat.releases import PMF_RELEASE, SMAT_RELEASE

log = logging.getLogger(__name__)

SMAT_LAYER_NORM_EPS = 1e-12     # Hugging Face ViTModel (facebook/dino-vits16), METHOD §1.1
PMF_LAYER_NORM_EPS = 1e-6       # DINO torch-hub ViT, METHOD §2.3
STAND_IN_SEED = 0               # --allow-missing-router: seed of the random router keys and skill tokens

_NET = "net.encoder."
_HEAD = "net.head.weight"
_DELTA = "delta_hypernet.phis."
_LOG_ALPHA = "mask_hypernet.log_alphas."
_ROUTER_BLOCK = "mask_hypernet.task_embed_agg."
# The tensors the official model holds but never registers (METHOD §7.1), by checkpoint name; `--router-extra`
# files may also name them without the `mask_hypernet.` prefix (as the authors' attributes are called).
_KEYS, _SKILLS, _COUNT, _LAMBDA = ("mask_hypernet.masks_keys", "mask_hypernet.skills_tokens",
                                   "mask_hypernet.count_encoding", "lagrangian_multiplier")
_EXTRA_NAMES = (_KEYS, _SKILLS, _COUNT, _LAMBDA)
_NEEDED_EXTRAS = (_KEYS, _SKILLS)                       # read by the eval forward; the other two are not
_HF_BLOCK_MODULES = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense", "intermediate.dense", "output.dense", "layernorm_before",
                     "layernorm_after")                 # transformers 4.30.2 module order within a layer
# Official router block (DINO Block) -> our SpectralNormBlock; spectrally normalised Linears first.
_ROUTER_LINEARS = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_SPECTRAL_NORM = {"weight_orig": "parametrizations.weight.original", "weight_u": "parametrizations.weight.0._u",
                  "weight_v": "parametrizations.weight.0._v"}


# --- reading the files -----------------------------------------------------------------------------------------

def _numpy_globals() -> list:
    """What PMF's pickled argparse.Namespace needs besides itself: numpy float64 scalars (METHOD §10)."""
    import numpy as np

    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    dtype_classes = [getattr(np.dtypes, name) for name in getattr(np.dtypes, "__all__", ())]
    # numpy 2 pickles name the scalar constructor `numpy._core.multiarray.scalar`, numpy 1.x `numpy.core...`.
    return [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *dtype_classes]


def _read(path: Path, what: str, fix: str) -> Any:
    _check_torch_file(path, what, fix)
    return load_torch(path, what, fix, allowed=(argparse.Namespace, *_numpy_globals()))


def _check_torch_file(path: Path, what: str, fix: str) -> None:
    """A file torch.save wrote is a zip archive (or, before torch 1.6, a pickle): say so plainly otherwise,
    instead of torch's long unpickler message."""
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head != b"PK\x03\x04" and head[:1] != b"\x80":
            raise SmatError(f"{path}: not a torch file (neither a torch.save zip archive nor a pickle), so not a "
                            f"{what}; {fix}")


def _kind(obj: Any) -> str | None:
    """Which format `obj` is: PMF_RELEASE, SMAT_RELEASE, "smat-model", "smat-backbone", or None."""
    if not isinstance(obj, dict):
        return None
    if obj.get("format") == MODEL_FORMAT:
        return "smat-model"
    if obj.get("format") == "smat-backbone/1":
        return "smat-backbone"
    inner = obj.get("model")
    if isinstance(inner, dict) and "scale_cls" in inner and any(str(k).startswith("backbone.") for k in inner):
        return PMF_RELEASE
    state = inner if isinstance(inner, dict) else obj
    if f"{_DELTA}0" in state or f"{_LOG_ALPHA}0" in state:
        return SMAT_RELEASE
    return None


def _wrong_kind(path: Path, kind: str | None, wanted: str) -> SmatError:
    if kind == PMF_RELEASE:
        return SmatError(f"{path}: is a PMF checkpoint (model.scale_cls, model.backbone.*), not an official SMAT "
                         f"one; import it with `smat import pmf {path} --out MODEL.pt`")
    if kind == SMAT_RELEASE:
        return SmatError(f"{path}: is an official SMAT checkpoint (delta_hypernet.phis.*), not a PMF one; import "
                         f"it with `smat import smat-official {path} --router-extra EXTRA.pt --out MODEL.pt`")
    if kind == "smat-model":
        return SmatError(f"{path}: is already a model checkpoint of this project; pass it to "
                         f"`smat evaluate --model` as it is")
    if kind == "smat-backbone":
        return SmatError(f"{path}: is a backbone checkpoint of this project; evaluate it as --model "
                         f"pretrained:{path}")
    return SmatError(f"{path}: not {wanted} checkpoint (none of its keys fit the documented layout, METHOD §10)")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _first(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --- SMAT: the official state dict ---------------------------------------------------------------------------

def hf_parameter_names(depth: int) -> list[str]:
    """θ_pre names of a transformers-4.30.2 ViTModel in `named_parameters()` order, without the `net.encoder.`
    prefix: the order that indexes `phis.{i}` and `log_alphas.{i}` (METHOD §10)."""
    names = ["embeddings.cls_token", "embeddings.position_embeddings",
             "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias"]
    for layer in range(depth):
        names += [f"encoder.layer.{layer}.{module}.{kind}" for module in _HF_BLOCK_MODULES
                  for kind in ("weight", "bias")]
    return names + ["layernorm.weight", "layernorm.bias"]


@dataclass
class OfficialSmat:
    """The tensors of an official SMAT checkpoint, renamed to timm (backbone) and to our router."""
    theta: dict[str, Tensor]                # θ_pre by timm name
    delta: dict[str, Tensor]                # δ, same names and shapes
    log_alpha: dict[str, Tensor]            # log α, (*shape, M)
    router: dict[str, Tensor]               # our `router.block.*` names without the prefix
    extras: dict[str, Tensor]               # present ones of _EXTRA_NAMES, by checkpoint name
    experts: int
    tau: float
    counter: int
    facts: dict[str, Any] = field(default_factory=dict)


def _smat_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    obj = _read(path, "official SMAT checkpoint", "pass the checkpoint.pt of the authors' SMAT code")
    if _kind(obj) != SMAT_RELEASE:
        raise _wrong_kind(path, _kind(obj), "an official SMAT")
    if isinstance(obj.get("model"), dict):
        return obj["model"], "{'model': state_dict, ...} (the authors' trainer)"
    return obj, "bare state dict (model card)"


_LAYER = re.compile(rf"^{re.escape(_NET)}encoder\.layer\.(\d+)\.")


def _depth(keys: list[str], path: Path) -> int:
    layers = {int(m.group(1)) for m in map(_LAYER.match, keys) if m}
    if not layers or layers != set(range(len(layers))):
        raise SmatError(f"{path}: no `{_NET}encoder.layer.N.*` blocks 0..L-1 found; the authors' checkpoints use "
                        f"transformers 4.30.2 ViTModel names (METHOD §10)")
    return len(layers)


def _backbone_names(state: dict[str, Tensor], path: Path) -> list[str]:
    """Checkpoint names of the backbone parameters, in the index order of phis / log_alphas."""
    keys = [k for k in state if k.startswith("net.")]
    names = [_NET + n for n in hf_parameter_names(_depth(keys, path))]
    if _HEAD in state:
        names.append(_HEAD)
    missing, unexpected = sorted(set(names) - set(keys)), sorted(set(keys) - set(names))
    if missing or unexpected:
        raise SmatError(f"{path}: the net.* keys are not a transformers-4.30.2 ViTModel (missing: "
                        f"{_first(missing) or 'none'}; unexpected: {_first(unexpected) or 'none'}); files written "
                        f"with transformers >= 5 names and order cannot be imported (METHOD §10)")
    return names


def _indexed(state: dict[str, Tensor], prefix: str, names: list[str], experts: int | None,
             path: Path) -> dict[str, Tensor]:
    """`prefix{i}` for every backbone parameter i, checked against its shape (plus the expert axis for log α)."""
    indices = sorted(int(k[len(prefix):]) for k in state if k.startswith(prefix) and k[len(prefix):].isdigit())
    if indices != list(range(len(names))):
        raise SmatError(f"{path}: expected {prefix}0..{len(names) - 1}, one per net.* parameter, found "
                        f"{len(indices)} ({prefix}{indices[0] if indices else '?'}..); not an official SMAT file")
    out = {}
    for i, name in enumerate(names):
        want = _shape(state[name]) + ((experts,) if experts is not None else ())
        if _shape(state[f"{prefix}{i}"]) != want:
            raise SmatError(f"{path}: {prefix}{i} has shape {_shape(state[f'{prefix}{i}'])} but {name} needs "
                            f"{want}; the index order is the net.* parameter order (METHOD §10)")
        out[name] = state[f"{prefix}{i}"]
    return out


def _to_timm(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF ViTModel names -> timm names; q, k, v stacked along dim 0 into `qkv` (the expert axis of log α is last,
    so the same rule fuses it)."""
    converted, _ = convert_to_timm({name[len(_NET):]: t for name, t in tensors.items() if name != _HEAD})
    return converted


def _router_block(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    expected = {f"{_ROUTER_BLOCK}{norm}.{kind}": f"{norm}.{kind}" for norm in ("norm1", "norm2")
                for kind in ("weight", "bias")}
    for theirs, ours in _ROUTER_LINEARS.items():
        expected.update({f"{_ROUTER_BLOCK}{theirs}.{old}": f"{ours}.{new}" for old, new in _SPECTRAL_NORM.items()})
        if theirs != "attn.qkv":                          # the official qkv has no bias
            expected[f"{_ROUTER_BLOCK}{theirs}.bias"] = f"{ours}.bias"
    present = [k for k in state if k.startswith(_ROUTER_BLOCK)]
    missing, unexpected = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
    if missing or unexpected:
        raise SmatError(f"{path}: router block {_ROUTER_BLOCK}* does not have the official layout with old-style "
                        f"spectral norm (missing: {_first(missing) or 'none'}; unexpected: "
                        f"{_first(unexpected) or 'none'})")
    return {ours: state[theirs] for theirs, ours in expected.items()}


def _counter(state: dict[str, Tensor], path: Path) -> int:
    value = state.get("num_metaupdates")
    if value is None or value.numel() != 1 or not float(value) >= 0 or not float(value).is_integer():
        raise SmatError(f"{path}: buffer num_metaupdates (the task counter of the router temperature) is missing "
                        f"or not one whole number: {None if value is None else value.tolist()}")
    return int(value)


def _tau(state: dict[str, Tensor], path: Path) -> tuple[int, float]:
    targets = state.get("mask_sparsity_targets")
    if targets is None or targets.ndim != 1 or not len(targets):
        raise SmatError(f"{path}: buffer mask_sparsity_targets (τ per expert) is missing or not a vector")
    if not torch.all(targets == targets[0]):
        raise SmatError(f"{path}: mask_sparsity_targets {targets.tolist()} differ between experts; this project's "
                        f"config has one τ for all experts")
    return len(targets), _float32(targets[0])


def _float32(value: Tensor) -> float:
    """The shortest decimal that is this float32 (0.9, not 0.8999999761581421)."""
    return float(str(value.float().numpy()))


def read_official_smat(path: Path) -> OfficialSmat:
    """Validate and rename the tensors of an official SMAT checkpoint (the router extras are checked later)."""
    state, container = _smat_state_dict(path)
    experts, tau = _tau(state, path)
    names = _backbone_names(state, path)
    delta = _indexed(state, _DELTA, names, None, path)
    log_alpha = _indexed(state, _LOG_ALPHA, names, experts, path)
    theta = {name: state[name] for name in names}
    known = set(names) | {f"{p}{i}" for p in (_DELTA, _LOG_ALPHA) for i in range(len(names))}
    known |= {"num_metaupdates", "mask_sparsity_targets", *_EXTRA_NAMES}
    unexpected = sorted(k for k in state if k not in known and not k.startswith(_ROUTER_BLOCK))
    if unexpected:
        raise SmatError(f"{path}: unexpected keys {_first(unexpected)} for an official SMAT checkpoint")
    dropped = [_HEAD, f"{_DELTA}{len(names) - 1}", f"{_LOG_ALPHA}{len(names) - 1}"] if _HEAD in state else []
    counter = _counter(state, path)
    facts = {"container": container, "backbone_naming": "transformers 4.30.2 ViTModel (net.encoder.*), "
             "query/key/value fused into timm qkv in that order", "index_order": "phis.i and log_alphas.i follow "
             "the net.* parameter order; log α has the expert axis last", "dropped_keys": dropped,
             "layer_norm_eps": SMAT_LAYER_NORM_EPS, "spectral_norm": "old-style weight_orig/u/v, stored u and v "
             "kept (eval uses them without power iteration)", "num_metaupdates": counter,
             "mask_sparsity_targets": [_float32(t) for t in state["mask_sparsity_targets"]]}
    return OfficialSmat(theta=_to_timm(theta), delta=_to_timm(delta), log_alpha=_to_timm(log_alpha),
                        router=_router_block(state, path), extras={k: state[k] for k in _EXTRA_NAMES if k in state},
                        experts=experts, tau=tau, counter=counter, facts=facts)


# --- SMAT: the router tensors the authors' code never saved ------------------------------------------------------

def _extra_shapes(official: OfficialSmat, skill_tokens: int) -> dict[str, tuple[int, ...]]:
    d = official.router["norm1.weight"].shape[0]
    return {_KEYS: (official.experts, d), _SKILLS: (1, skill_tokens, d), _COUNT: (1, 1, d),
            _LAMBDA: (official.experts,)}


def _read_router_extra(path: Path) -> dict[str, Tensor]:
    fix = f"save a dict of tensors named {', '.join(_EXTRA_NAMES)} with torch.save"
    _check_torch_file(path, "router extra file", fix)
    obj = load_torch(path, "router extra file", fix)
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise SmatError(f"{path}: expected a dict of tensors named {', '.join(_EXTRA_NAMES)}")
    by_short_name = {name.removeprefix("mask_hypernet."): name for name in _EXTRA_NAMES}
    out = {}
    for key, value in obj.items():
        name = key if key in _EXTRA_NAMES else by_short_name.get(key)
        if name is None:
            raise SmatError(f"{path}: unknown tensor {key!r}; a router extra file holds "
                            f"{', '.join(_EXTRA_NAMES)} (or their names without `mask_hypernet.`)")
        out[name] = value
    return out


def router_extras(official: OfficialSmat, source: Path, extra_path: Path | None,
                  allow_missing: bool = False) -> dict[str, Tensor]:
    """The keys, skill tokens and λ from the checkpoint or `--router-extra`, shape-checked.

    Raises the one-line explanation when the keys or skill tokens are in neither, unless `allow_missing`."""
    extras = dict(official.extras)
    if extra_path is not None:
        for name, value in _read_router_extra(extra_path).items():
            if name in extras and not torch.equal(extras[name], value):
                raise SmatError(f"{extra_path}: {name} differs from the one in {source}; drop it from the extra file")
            extras[name] = value
    where = extra_path or source
    skill_tokens = extras[_SKILLS].shape[1] if _SKILLS in extras and extras[_SKILLS].ndim == 3 else 4
    for name, want in _extra_shapes(official, skill_tokens).items():
        if name in extras and _shape(extras[name]) != want:
            raise SmatError(f"{where}: {name} has shape {_shape(extras[name])} but this checkpoint needs {want} "
                            f"(M = {official.experts} experts, width {want[-1]})")
    missing = [name for name in _NEEDED_EXTRAS if name not in extras]
    if missing and not allow_missing:
        shapes = _extra_shapes(official, skill_tokens)
        raise SmatError(
            f"{source}: the router tensors {' and '.join(f'{n} {shapes[n]}' for n in missing)} are not in the file: "
            f"the authors' code never registered them, so they were never saved (METHOD §7.1, §10); supply them "
            f"with --router-extra FILE (a torch dict with {', '.join(_EXTRA_NAMES)}; the last two optional), or "
            f"pass --allow-missing-router for random stand-ins, which make a different model than the release")
    return extras


# --- SMAT: building our model ------------------------------------------------------------------------------------

def _arch_spec(theta: dict[str, Tensor], norm_eps: float, arch: str | None, heads: int | None,
               path: Path) -> tuple[str, dict[str, Any]]:
    """(backbone name, architecture spec) from the weights' shapes; the heads from --heads or the registry."""
    d, patch = theta["cls_token"].shape[-1], theta["patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in theta if k.startswith("blocks.")})
    mlp_ratio = theta["blocks.0.mlp.fc1.weight"].shape[0] / d
    grid = math.isqrt(theta["pos_embed"].shape[1] - 1)
    if grid * grid + 1 != theta["pos_embed"].shape[1]:
        raise SmatError(f"{path}: position table has {theta['pos_embed'].shape[1]} tokens, not 1 + a square grid")
    sizes = {"embed_dim": d, "depth": depth, "patch_size": patch, "mlp_ratio": mlp_ratio}
    # timm's default MLP ratio is 4: the registry names it only where it differs.
    fits = [name for name, entry in BACKBONES.items()
            if all({"mlp_ratio": 4.0, **entry["kwargs"]}[key] == value for key, value in sizes.items())]
    if arch is not None:
        backbone_spec(arch)                                 # unknown name: SmatError listing the known ones
        if arch not in fits:
            raise SmatError(f"{path}: --arch {arch} does not fit the weights ({sizes}); leave it out and pass "
                            f"--heads N instead")
        fits = [arch]
    name = fits[0] if len(fits) == 1 else f"imported_vit_d{d}_depth{depth}_patch{patch}"
    heads = heads or (BACKBONES[name]["kwargs"]["num_heads"] if len(fits) == 1 else None)
    if heads is None:
        raise SmatError(f"{path}: no registered backbone has these sizes ({sizes}), and the number of attention "
                        f"heads cannot be read from the weights; pass --heads N")
    if d % heads:
        raise SmatError(f"--heads {heads}: the width {d} is not divisible by it")
    return name, {**sizes, "num_heads": heads, "grid": grid, "norm_eps": norm_eps, "pos_embed": POS_EMBED_PER_FORWARD}


def _backbone_record(name: str, spec: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    size = image_size or spec["grid"] * spec["patch_size"]
    return {"arch": name, "image_size": size, "pretrained_sha256": None, "spec": spec}


def _check_backbone(theta: dict[str, Tensor], backbone, path: Path) -> None:
    want = {name: _shape(p) for name, p in backbone_parameters(backbone).items()}
    got = {name: _shape(t) for name, t in theta.items()}
    if want != got:
        problems = sorted(set(want) ^ set(got)) + [f"{n} {got[n]} vs {want[n]}" for n in want
                                                   if n in got and got[n] != want[n]]
        raise SmatError(f"{path}: backbone weights do not fit the ViT they describe: {_first(problems)}")
    if not_float := [name for name, t in theta.items() if not t.is_floating_point()]:
        # load_state_dict would cast them silently
        raise SmatError(f"{path}: backbone tensor {not_float[0]} holds {theta[not_float[0]].dtype} values, not "
                        "floating-point weights")


def _flat_log_alpha(log_alpha: dict[str, Tensor], names: list[str], experts: int) -> Tensor:
    """Per-tensor (*shape, M) -> our (M, N): row m is expert m over the flat layout (METHOD §1.2 Choice)."""
    return torch.cat([log_alpha[name].movedim(-1, 0).reshape(experts, -1) for name in names], dim=1)


def _smat_config(official: OfficialSmat, image_size: int, skill_tokens: int) -> ModelConfig:
    hidden = official.router["fc1.parametrizations.weight.original"].shape[0]
    d = official.router["norm1.weight"].shape[0]
    router = RouterConfig(heads=4, mlp_ratio=hidden / d, skill_tokens=skill_tokens)   # 4 heads: METHOD §1.4.3
    return ModelConfig(method=SMAT.method, image_size=image_size, experts=official.experts, tau=official.tau,
                       router=router)


def import_smat_official(path: Path, out: Path, *, router_extra: Path | None = None,
                         allow_missing_router: bool = False, arch: str | None = None, heads: int | None = None,
                         image_size: int | None = None) -> None:
    """`smat import smat-official`: write the official SMAT checkpoint `path` as a model checkpoint `out`."""
    path, out = Path(path), Path(out)
    _check_out(out)
    official = read_official_smat(path)
    name, spec = _arch_spec(official.theta, SMAT_LAYER_NORM_EPS, arch, heads, path)
    extras = router_extras(official, path, router_extra, allow_missing_router)
    found_in = {name: str(router_extra if router_extra is not None and name not in official.extras else path)
                for name in extras}
    stand_ins = [name for name in _NEEDED_EXTRAS if name not in extras]
    if stand_ins:
        log.warning("%s: %s are random stand-ins (--allow-missing-router), not the released values: the imported "
                    "model routes differently from the released one", out, " and ".join(stand_ins))
    backbone_record = _backbone_record(name, spec, image_size)
    skill_tokens = extras[_SKILLS].shape[1] if _SKILLS in extras else RouterConfig().skill_tokens
    config = _smat_config(official, backbone_record["image_size"], skill_tokens)
    with torch.random.fork_rng():
        torch.manual_seed(STAND_IN_SEED)            # the stand-ins (our router's initialisation) are reproducible
        backbone = create_backbone(name, backbone_record["image_size"], spec=spec)
        model = build_model(config, backbone)
    _check_backbone(official.theta, backbone, path)
    state = model.state_dict()
    state.update({f"backbone.vit.{n}": t for n, t in official.theta.items()})
    state.update({f"router.block.{n}": t for n, t in official.router.items()})
    state["experts.delta"] = model.experts.layout.flatten(official.delta)
    state["experts.log_alpha"] = _flat_log_alpha(official.log_alpha, model.experts.layout.names, official.experts)
    state.update({ours: extras[theirs] for theirs, ours in ((_KEYS, "router.keys"), (_SKILLS, "router.skill_tokens"))
                  if theirs in extras})
    state["lagrangian"] = extras.get(_LAMBDA, torch.zeros(official.experts))   # λ: training only
    state["tasks_seen"] = torch.tensor(official.counter)
    model.load_state_dict(state, strict=True)
    stand_in = f"random stand-in (seed {STAND_IN_SEED}): NOT the released value, which the authors' code never saved"
    facts = {**official.facts, **{name: found_in.get(name, stand_in) for name in _NEEDED_EXTRAS},
             _LAMBDA: found_in.get(_LAMBDA, "absent: zeros (training only)"),
             "count_encoding": "not used (never read by the official forward)",
             "router_temperature": model.temperature(official.counter),
             "pos_embed": f"stored {spec['grid']}x{spec['grid']} table (θ_pre, δ, log α), {POS_EMBED_PER_FORWARD}"}
    if router_extra is not None:
        facts["router_extra_sha256"] = sha256_file(router_extra)
    _save(out, model, to_dict(config), backbone_record, {"tasks_seen": official.counter}, SMAT_RELEASE, path,
          facts)


# --- PMF -----------------------------------------------------------------------------------------------------

def read_pmf(path: Path) -> tuple[dict[str, Tensor], Tensor, Tensor, dict[str, Any]]:
    """(backbone weights by timm name, scale_cls, bias, facts) of PMF's `checkpoint.pth` / `best.pth`."""
    obj = _read(path, "PMF checkpoint", "pass the checkpoint.pth or best.pth written by PMF's main.py")
    if _kind(obj) != PMF_RELEASE:
        raise _wrong_kind(path, _kind(obj), "a PMF")
    model = obj["model"]
    unexpected = sorted(k for k in model if k not in ("scale_cls", "bias") and not k.startswith("backbone."))
    if unexpected or "bias" not in model:
        raise SmatError(f"{path}: model holds {_first(unexpected) or 'no bias'}; a PMF ProtoNet state dict has "
                        f"only scale_cls, bias and backbone.* (METHOD §2.3)")
    for key in ("scale_cls", "bias"):
        if model[key].numel() != 1 or not model[key].is_floating_point():
            raise SmatError(f"{path}: model.{key} has shape {_shape(model[key])} and dtype {model[key].dtype}, "
                            "expected one floating-point value")
    if not model["scale_cls"].item() > 0:    # scale · (cos + bias): a scale <= 0 (or NaN) inverts or erases it
        raise SmatError(f"{path}: model.scale_cls is {model['scale_cls'].item()}; PMF's classifier scale must be "
                        "positive")
    theta = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    args = obj.get("args")
    facts = {"container": "PMF main.py checkpoint: model, optimizer, lr_scheduler, epoch, model_ema, args, scalar",
             "backbone_naming": "DINO torch-hub / timm (backbone.*)", "layer_norm_eps": PMF_LAYER_NORM_EPS,
             "classifier": "scale_cls * (cos + bias), both stored", "epoch": obj.get("epoch"),
             "args_arch": getattr(args, "arch", None), "args_image_size": getattr(args, "image_size", None)}
    return theta, model["scale_cls"], model["bias"], facts


def import_pmf(path: Path, out: Path, *, arch: str | None = None, heads: int | None = None,
               image_size: int | None = None) -> None:
    """`smat import pmf`: write PMF's checkpoint `path` as a model checkpoint `out`."""
    path, out = Path(path), Path(out)
    _check_out(out)
    theta, scale, bias, facts = read_pmf(path)
    for key in ("cls_token", "patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in theta:
            raise SmatError(f"{path}: model.backbone.{key} is missing; not a PMF ViT checkpoint")
    name, spec = _arch_spec(theta, PMF_LAYER_NORM_EPS, arch, heads, path)
    backbone_record = _backbone_record(name, spec, image_size)
    config = ModelConfig(method=PMF.method, image_size=backbone_record["image_size"])
    backbone = create_backbone(name, backbone_record["image_size"], spec=spec)
    model = build_model(config, backbone)
    _check_backbone(theta, backbone, path)
    state = model.state_dict()
    state.update({f"backbone.vit.{n}": t for n, t in theta.items()})
    state["head.scale"], state["head.bias"] = scale.reshape(()), bias.reshape(())
    model.load_state_dict(state, strict=True)
    facts["pos_embed"] = f"stored {spec['grid']}x{spec['grid']} table, {POS_EMBED_PER_FORWARD}"
    _save(out, model, to_dict(config), backbone_record, {"epoch": facts["epoch"], "tasks_seen": 0}, PMF_RELEASE, path,
          facts)


# --- writing -----------------------------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.is_dir():
        raise SmatError(f"--out {out}: is a folder; give the path of the model file to write")


def _save(out: Path, model, config: dict, backbone: dict, progress: dict, importer: str, source: Path,
          facts: dict[str, Any]) -> None:
    """The "smat-model/1" record of `smat.methods.checkpoint`, with where it came from. The config is the
    model's settings only: the release's training settings are not ours to state."""
    imported = {"importer": importer, "source": str(source), "source_sha256": sha256_file(source), "layout": facts}
    save_model_checkpoint(out, model, config, backbone, progress, imported=imported)
    log.info("%s: %s imported from %s (sha256 %s)", out, model.method, source, imported["source_sha256"])
