"""`smat import`: the authors' SMAT and PMF checkpoints become model checkpoints that evaluate as the originals.

Against the official fixtures (/work/shared/fixtures/official, written by the authors' code; skipped when the
folder is absent): query logits within the fixture README's 2e-5, equal predictions, α within 1e-5, the router
temperature, at 32 px and at 20 px (position table resampled per forward). Without the fixtures: tiny files
built here in the documented layouts, round-tripped through the importer and checked against the README's
eval rules computed independently in this file (METHOD §10).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.func import functional_call

from smat.cli import main
from smat.io import SmatError
from smat.methods.checkpoint import load_trained
from smat.models.backbones import create_backbone, resample_pos_embed_by_scale
from smat.releases.official import hf_parameter_names, import_pmf, import_smat_official

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official"
SMAT_DIR, PMF_DIR = FIXTURES / "smat_vits_hf_tiny", FIXTURES / "pmf_tiny"
LOGIT_TOL = 2e-5            # the fixture README's tolerance on query logits (§1.5)
ALPHA_TOL = 1e-5
EPISODES = ("", "_20px")    # episode{suffix}.pt / expected{suffix}.pt

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"official fixtures not found at {FIXTURES} "
                                    "(a clone without the shared folder); the self-made-format tests still run")


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def eval_logits(model, support_x, support_y, query_x):
    """What `smat evaluate` computes per episode without fine-tuning (EpisodeRunner._run_one)."""
    with torch.no_grad():
        params = model.task_params(support_x, support_y)
        support_f, query_f = model.features(params.weights, support_x), model.features(params.weights, query_x)
        return model.head_logits(support_f, support_y, query_f, int(support_y.max()) + 1), params.alpha


def assert_one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


# --- against the official fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_smat(tmp_path_factory):
    if not FIXTURES.is_dir():
        pytest.skip(f"official fixtures not found at {FIXTURES}")
    out = tmp_path_factory.mktemp("import") / "smat.pt"
    import_smat_official(SMAT_DIR / "checkpoint.pt", out, router_extra=SMAT_DIR / "router_extra.pt", heads=3)
    return load_trained(out, "cpu")


@pytest.fixture(scope="module")
def official_pmf(tmp_path_factory):
    if not FIXTURES.is_dir():
        pytest.skip(f"official fixtures not found at {FIXTURES}")
    out = tmp_path_factory.mktemp("import") / "pmf.pt"
    import_pmf(PMF_DIR / "checkpoint.pth", out, heads=3)
    return load_trained(out, "cpu")


@needs_fixtures
@pytest.mark.parametrize("suffix", EPISODES, ids=["32px", "20px"])
def test_imported_smat_reproduces_the_official_eval_outputs(official_smat, suffix):
    model, _ = official_smat
    episode, expected = load(SMAT_DIR / f"episode{suffix}.pt"), load(SMAT_DIR / f"expected{suffix}.pt")
    logits, alpha = eval_logits(model, episode["support_x"], episode["support_y"], episode["query_x"])
    torch.testing.assert_close(logits, expected["query_logits"], atol=LOGIT_TOL, rtol=0)
    assert torch.equal(logits.argmax(-1), expected["pred"])
    torch.testing.assert_close(alpha, expected["alpha"], atol=ALPHA_TOL, rtol=0)
    assert model.temperature(int(model.tasks_seen)) == expected["temperature"]


@needs_fixtures
@pytest.mark.parametrize("suffix", EPISODES, ids=["32px", "20px"])
def test_imported_smat_at_30000_meta_updates_reproduces_the_official_outputs(official_smat, suffix):
    model, _ = official_smat
    episode, expected = load(SMAT_DIR / f"episode{suffix}.pt"), load(SMAT_DIR / f"expected{suffix}.pt")
    late = expected["at_num_metaupdates_30000"]
    stored = int(model.tasks_seen)
    model.tasks_seen.fill_(int(late["num_metaupdates"]))       # the official run set its counter buffer alike
    try:
        logits, alpha = eval_logits(model, episode["support_x"], episode["support_y"], episode["query_x"])
        assert model.temperature(int(model.tasks_seen)) == late["temperature"]
    finally:
        model.tasks_seen.fill_(stored)
    torch.testing.assert_close(logits, late["query_logits"], atol=LOGIT_TOL, rtol=0)
    assert torch.equal(logits.argmax(-1), late["pred"])
    torch.testing.assert_close(alpha, late["alpha"], atol=ALPHA_TOL, rtol=0)


@needs_fixtures
def test_imported_smat_records_the_official_facts(official_smat):
    model, record = official_smat
    config, imported = record["config"], record["provenance"]["imported"]
    assert (config["method"], config["experts"], config["image_size"]) == ("smat", 2, 32)
    assert config["tau"] == pytest.approx(float(load(SMAT_DIR / "checkpoint.pt")["mask_sparsity_targets"][0]))
    assert imported["importer"] == "smat-official" and imported["source"].endswith("checkpoint.pt")
    assert len(imported["source_sha256"]) == 64
    assert imported["layout"]["dropped_keys"][0] == "net.head.weight"
    assert record["backbone"]["spec"]["norm_eps"] == 1e-12
    assert all(m.eps == 1e-12 for m in model.backbone.modules() if isinstance(m, nn.LayerNorm))
    # The eval σ of each spectrally normalised router layer is uᵀ W v with the stored u, v.
    sigmas = load(SMAT_DIR / "expected.pt")["spectral_norm_sigmas"]
    for theirs, ours in (("attn.qkv", "qkv"), ("mlp.fc2", "fc2")):
        layer = getattr(model.router.block, ours)
        sigma = (layer.parametrizations.weight.original / layer.weight).mean().item()
        assert sigma == pytest.approx(sigmas[theirs]["sigma_eval_uWv"], rel=1e-5)


@needs_fixtures
@pytest.mark.parametrize("suffix", EPISODES, ids=["32px", "20px"])
def test_imported_pmf_reproduces_the_official_eval_outputs(official_pmf, suffix):
    model, _ = official_pmf
    episode, expected = load(PMF_DIR / f"episode{suffix}.pt"), load(PMF_DIR / f"expected{suffix}.pt")
    logits, alpha = eval_logits(model, episode["support_x"], episode["support_y"], episode["query_x"])
    assert alpha is None
    torch.testing.assert_close(logits, expected["query_logits"], atol=LOGIT_TOL, rtol=0)
    assert torch.equal(logits.argmax(-1), expected["pred"])
    with torch.no_grad():
        features = model.features(model.frozen_weights(), episode["query_x"])
    torch.testing.assert_close(features, expected["query_features"], atol=LOGIT_TOL, rtol=0)
    assert model.head.scale.item() == pytest.approx(expected["scale_cls"])
    assert model.head.bias.item() == pytest.approx(expected["bias"])
    assert all(m.eps == 1e-6 for m in model.backbone.modules() if isinstance(m, nn.LayerNorm))


@needs_fixtures
def test_resampling_by_target_size_would_miss_the_official_20px_outputs(official_pmf):
    """The (n + 0.1) scale factor matters: a resize to the target grid is outside the tolerance."""
    model, _ = official_pmf
    episode, expected = load(PMF_DIR / "episode_20px.pt"), load(PMF_DIR / "expected_20px.pt")
    weights = model.frozen_weights()
    grid = episode["image_size"] // model.backbone.vit.patch_embed.patch_size[0]
    weights["pos_embed"] = resample_abs_pos_embed(weights["pos_embed"], new_size=[grid, grid], antialias=False)
    with torch.no_grad():
        support_f, query_f = (model.features(weights, episode[k]) for k in ("support_x", "query_x"))
        logits = model.head_logits(support_f, episode["support_y"], query_f, 5)
    assert (logits - expected["query_logits"]).abs().max() > 10 * LOGIT_TOL


@needs_fixtures
def test_fixture_without_router_tensors_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SmatError) as excinfo:
        import_smat_official(SMAT_DIR / "checkpoint.pt", tmp_path / "m.pt", heads=3)
    assert_one_line_error(excinfo, str(SMAT_DIR / "checkpoint.pt"), "mask_hypernet.masks_keys",
                          "mask_hypernet.skills_tokens", "never registered", "--router-extra")
    assert not (tmp_path / "m.pt").exists()


@needs_fixtures
def test_fixture_formats_are_told_apart(tmp_path):
    with pytest.raises(SmatError) as excinfo:
        import_smat_official(PMF_DIR / "checkpoint.pth", tmp_path / "m.pt", heads=3)
    assert_one_line_error(excinfo, str(PMF_DIR / "checkpoint.pth"), "PMF", "smat import pmf")
    with pytest.raises(SmatError) as excinfo:
        import_pmf(SMAT_DIR / "checkpoint.pt", tmp_path / "m.pt", heads=3)
    assert_one_line_error(excinfo, str(SMAT_DIR / "checkpoint.pt"), "smat import smat-official")


# --- self-made files in the documented layouts (no fixtures needed) --------------------------------------------

D, DEPTH, HEADS, EXPERTS, GRID, PATCH, HIDDEN, SKILLS = 8, 1, 2, 2, 3, 4, 16, 4


def hf_shapes() -> dict[str, tuple[int, ...]]:
    """θ_pre shapes of a tiny HF ViTModel, by the names `hf_parameter_names` orders."""
    shapes = {"embeddings.cls_token": (1, 1, D), "embeddings.position_embeddings": (1, 1 + GRID * GRID, D),
              "embeddings.patch_embeddings.projection.weight": (D, 3, PATCH, PATCH),
              "embeddings.patch_embeddings.projection.bias": (D,), "layernorm.weight": (D,), "layernorm.bias": (D,)}
    linears = {"intermediate.dense": (HIDDEN, D), "output.dense": (D, HIDDEN)}       # the others are (D, D)
    for name in hf_parameter_names(DEPTH):
        if name.startswith("encoder.layer."):
            module, kind = name.split(".", 3)[3].rsplit(".", 1)                    # after "encoder.layer.N."
            out, inp = (D, None) if module.startswith("layernorm") else linears.get(module, (D, D))
            shapes[name] = (out, inp) if kind == "weight" and inp else (out,)
    return shapes


def official_smat_files(tmp_path: Path, wrapped: bool = False) -> tuple[Path, Path, dict, dict]:
    """(checkpoint.pt, router_extra.pt, state dict, extras) of a tiny SMAT in the official layout (fixture README
    §1.2): the two buffers, net.*, phis.i, log_alphas.i (expert axis last), the zero head, the router block with
    old-style spectral norm; keys, skill tokens and λ only in the extra file."""
    g = torch.Generator().manual_seed(7)
    shapes = hf_shapes()
    names = [f"net.encoder.{n}" for n in hf_parameter_names(DEPTH)] + ["net.head.weight"]
    shapes = {f"net.encoder.{n}": s for n, s in shapes.items()} | {"net.head.weight": (1, D)}
    state = {"mask_sparsity_targets": torch.full((EXPERTS,), 0.9), "num_metaupdates": torch.tensor([14000.0])}
    state.update({n: torch.randn(shapes[n], generator=g) * 0.3 for n in names})
    state["net.head.weight"] = torch.zeros(1, D)
    state.update({f"delta_hypernet.phis.{i}": torch.randn(shapes[n], generator=g) * 0.2 for i, n in enumerate(names)})
    state.update({f"mask_hypernet.log_alphas.{i}": torch.randn(*shapes[n], EXPERTS, generator=g) * 4
                  for i, n in enumerate(names)})
    block = "mask_hypernet.task_embed_agg."
    for norm in ("norm1", "norm2"):
        state[f"{block}{norm}.weight"], state[f"{block}{norm}.bias"] = 1 + 0.1 * torch.randn(D, generator=g), \
            0.05 * torch.randn(D, generator=g)
    for layer, (out, inp, bias) in {"attn.qkv": (3 * D, D, False), "attn.proj": (D, D, True),
                                    "mlp.fc1": (2 * D, D, True), "mlp.fc2": (D, 2 * D, True)}.items():
        state[f"{block}{layer}.weight_orig"] = torch.randn(out, inp, generator=g) / math.sqrt(inp)
        state[f"{block}{layer}.weight_u"] = F.normalize(torch.randn(out, generator=g), dim=0)
        state[f"{block}{layer}.weight_v"] = F.normalize(torch.randn(inp, generator=g), dim=0)
        if bias:
            state[f"{block}{layer}.bias"] = 0.05 * torch.randn(out, generator=g)
    extras = {"masks_keys": torch.randn(EXPERTS, D, generator=g), "skills_tokens": torch.randn(1, SKILLS, D,
              generator=g) * 0.5, "count_encoding": torch.randn(1, 1, D, generator=g),
              "lagrangian_multiplier": torch.rand(EXPERTS, generator=g)}
    checkpoint, extra = tmp_path / "checkpoint.pt", tmp_path / "router_extra.pt"
    torch.save({"model": state, "optimizer": {}} if wrapped else state, checkpoint)
    torch.save(extras, extra)
    return checkpoint, extra, state, extras


def reference_alpha(state: dict, extras: dict, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official router in eval mode (fixture README §1.2-1.3): stored u, v; token 0; σ(ℓ/T) normalised."""
    block = "mask_hypernet.task_embed_agg."

    def linear(name, x):
        w = state[f"{block}{name}.weight_orig"]
        w = w / (state[f"{block}{name}.weight_u"] @ w @ state[f"{block}{name}.weight_v"])
        return x @ w.t() + state.get(f"{block}{name}.bias", 0)

    def norm(name, x):
        return F.layer_norm(x, (D,), state[f"{block}{name}.weight"], state[f"{block}{name}.bias"], eps=1e-5)

    x = torch.cat([prototypes[None], extras["skills_tokens"]], dim=1)
    q, k, v = linear("attn.qkv", norm("norm1", x)).reshape(1, len(x[0]), 3, 4, D // 4).permute(2, 0, 3, 1, 4)
    attended = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // 4), dim=-1) @ v
    x = x + linear("attn.proj", attended.transpose(1, 2).reshape(1, -1, D))
    x = x + linear("mlp.fc2", F.gelu(linear("mlp.fc1", norm("norm2", x))))
    scores = torch.sigmoid(extras["masks_keys"] @ x[0, 0] / temperature)
    return scores / (scores.sum() + 1e-8)


def reference_theta_task(state: dict, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """θ_pre + (Σ α_m z_m) ⊙ δ per official tensor (README §1.3 steps 1, 6, 7), renamed and fused to timm."""
    merged = {}
    for i, name in enumerate(hf_parameter_names(DEPTH)):
        z = (torch.sigmoid(state[f"mask_hypernet.log_alphas.{i}"].clamp(math.log(0.01), math.log(100))) * 1.2
             - 0.1).clamp(0, 1)
        merged[name] = state[f"net.encoder.{name}"] + (z * alpha).sum(-1) * state[f"delta_hypernet.phis.{i}"]
    timm = {"cls_token": merged["embeddings.cls_token"], "pos_embed": merged["embeddings.position_embeddings"],
            "patch_embed.proj.weight": merged["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": merged["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": merged["layernorm.weight"], "norm.bias": merged["layernorm.bias"]}
    renames = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
               "layernorm_before": "norm1", "layernorm_after": "norm2"}
    for layer in range(DEPTH):
        hf = f"encoder.layer.{layer}."
        for kind in ("weight", "bias"):
            timm[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
                [merged[f"{hf}attention.attention.{part}.{kind}"] for part in ("query", "key", "value")])
            timm.update({f"blocks.{layer}.{ours}.{kind}": merged[f"{hf}{theirs}.{kind}"]
                         for theirs, ours in renames.items()})
    return timm


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "trainer-dict"])
def test_self_made_official_smat_round_trips_through_the_importer(tmp_path, wrapped):
    checkpoint, extra, state, extras = official_smat_files(tmp_path, wrapped)
    out = tmp_path / "model.pt"
    import_smat_official(checkpoint, out, router_extra=extra, heads=HEADS)
    model, record = load_trained(out, "cpu")
    assert record["config"]["tau"] == 0.9 and record["config"]["router"]["skill_tokens"] == SKILLS
    assert int(model.tasks_seen) == 14000 and model.temperature(14000) == 1.5
    torch.testing.assert_close(model.lagrangian.detach(), extras["lagrangian_multiplier"])
    g = torch.Generator().manual_seed(1)
    size = GRID * PATCH
    support_x, query_x = torch.randn(6, 3, size, size, generator=g), torch.randn(4, 3, size, size, generator=g)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        prototypes = model.head.prototypes(model.backbone(support_x), support_y, 3)
        params = model.task_params(support_x, support_y)
    torch.testing.assert_close(params.alpha, reference_alpha(state, extras, prototypes, 1.5), atol=1e-6, rtol=0)
    expected = reference_theta_task(state, params.alpha)
    assert set(params.weights) == set(expected)
    for name, weight in params.weights.items():
        torch.testing.assert_close(weight, expected[name], atol=1e-6, rtol=0, msg=name)
    logits, _ = eval_logits(model, support_x, support_y, query_x)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


def test_the_merged_position_table_is_resampled_on_every_forward(tmp_path):
    """Smaller inputs: the task's merged table is resampled inside the forward (README §1.4 "20 px extra"), as if
    a backbone at the smaller grid had been given the resampled merged table."""
    checkpoint, extra, _, _ = official_smat_files(tmp_path)
    import_smat_official(checkpoint, tmp_path / "model.pt", router_extra=extra, heads=HEADS)
    model, record = load_trained(tmp_path / "model.pt", "cpu")
    small = torch.randn(5, 3, 2 * PATCH, 2 * PATCH, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 0, 1, 0])
    with torch.no_grad():
        weights = model.task_params(small, labels).weights
        features = model.features(weights, small)
        at_grid_2 = create_backbone("grid2", spec={**record["backbone"]["spec"], "grid": 2})
        resampled = {**weights, "pos_embed": resample_pos_embed_by_scale(weights["pos_embed"], 2, 2)}
        expected = functional_call(at_grid_2, {f"vit.{n}": w for n, w in resampled.items()}, (small,))
    assert torch.equal(features, expected)


def test_without_router_tensors_the_import_is_refused_unless_stand_ins_are_allowed(tmp_path):
    checkpoint, _, _, _ = official_smat_files(tmp_path)
    with pytest.raises(SmatError) as excinfo:
        import_smat_official(checkpoint, tmp_path / "m.pt", heads=HEADS)
    assert_one_line_error(excinfo, str(checkpoint), f"mask_hypernet.masks_keys ({EXPERTS}, {D})",
                          "mask_hypernet.skills_tokens", "--router-extra", "--allow-missing-router")
    import_smat_official(checkpoint, tmp_path / "m.pt", heads=HEADS, allow_missing_router=True)
    _, record = load_trained(tmp_path / "m.pt", "cpu")
    assert "NOT the released value" in record["provenance"]["imported"]["layout"]["mask_hypernet.masks_keys"]


def test_router_extra_with_a_wrong_shape_or_name_is_refused(tmp_path):
    checkpoint, extra, _, extras = official_smat_files(tmp_path)
    torch.save({**extras, "masks_keys": torch.zeros(EXPERTS + 1, D)}, extra)
    with pytest.raises(SmatError) as excinfo:
        import_smat_official(checkpoint, tmp_path / "m.pt", router_extra=extra, heads=HEADS)
    assert_one_line_error(excinfo, str(extra), "mask_hypernet.masks_keys", f"({EXPERTS + 1}, {D})",
                          f"({EXPERTS}, {D})")
    torch.save({**extras, "keys": extras["masks_keys"]}, extra)
    with pytest.raises(SmatError) as excinfo:
        import_smat_official(checkpoint, tmp_path / "m.pt", router_extra=extra, heads=HEADS)
    assert_one_line_error(excinfo, str(extra), "'keys'")


def test_a_file_that_is_not_a_torch_file_is_refused(tmp_path):
    bogus = tmp_path / "checkpoint.pt"
    bogus.write_text("not a checkpoint")
    for importer in (import_smat_official, import_pmf):
        with pytest.raises(SmatError) as excinfo:
            importer(bogus, tmp_path / "m.pt", heads=HEADS)
        assert_one_line_error(excinfo, str(bogus), "not a torch file")


def test_heads_are_required_when_no_registered_backbone_has_the_sizes(tmp_path):
    checkpoint, extra, _, _ = official_smat_files(tmp_path)
    with pytest.raises(SmatError) as excinfo:
        import_smat_official(checkpoint, tmp_path / "m.pt", router_extra=extra)
    assert_one_line_error(excinfo, str(checkpoint), "--heads")


def official_pmf_file(tmp_path: Path) -> tuple[Path, dict]:
    """PMF's main.py container (fixture README §2.2): the ProtoNet state dict and a Namespace with numpy floats."""
    from smat.releases.official import PMF_LAYER_NORM_EPS, POS_EMBED_PER_FORWARD

    spec = {"embed_dim": D, "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 2.0, "patch_size": PATCH, "grid": GRID,
            "norm_eps": PMF_LAYER_NORM_EPS, "pos_embed": POS_EMBED_PER_FORWARD}
    torch.manual_seed(3)
    vit = create_backbone("tiny", spec=spec).vit
    model = {"bias": torch.tensor([-0.15]), "scale_cls": torch.tensor([8.0])}
    model.update({f"backbone.{n}": p.detach() + 0.1 * torch.randn_like(p) for n, p in vit.named_parameters()})
    args = argparse.Namespace(arch="dino_small_patch16", min_log_weight=np.float64(-0.69), image_size=12)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model, "optimizer": {"state": {}}, "lr_scheduler": {}, "epoch": 3, "model_ema": None,
                "args": args, "scalar": {"scale": 65536.0}}, path)
    return path, model


def test_self_made_pmf_round_trips_through_the_importer(tmp_path):
    path, state = official_pmf_file(tmp_path)
    out = tmp_path / "pmf.pt"
    import_pmf(path, out, heads=HEADS)
    model, record = load_trained(out, "cpu")
    assert record["method"] == "pmf" and record["progress"]["epoch"] == 3
    for name, weight in model.frozen_weights().items():
        assert torch.equal(weight, state[f"backbone.{name}"]), name
    g = torch.Generator().manual_seed(2)
    support_x, query_x, support_y = torch.randn(4, 3, 12, 12, generator=g), torch.randn(3, 3, 12, 12), \
        torch.tensor([0, 1, 0, 1])
    logits, _ = eval_logits(model, support_x, support_y, query_x)
    with torch.no_grad():
        support_f, query_f = model.backbone(support_x), model.backbone(query_x)
    prototypes = torch.stack([support_f[support_y == c].mean(0) for c in range(2)])
    cosine = F.normalize(query_f, dim=-1) @ F.normalize(prototypes, dim=-1).t()
    torch.testing.assert_close(logits, 8.0 * (cosine + -0.15), atol=1e-6, rtol=0)   # scale outside, bias inside


def test_self_made_formats_are_told_apart(tmp_path):
    smat_checkpoint, _, _, _ = official_smat_files(tmp_path)
    pmf_checkpoint, _ = official_pmf_file(tmp_path)
    with pytest.raises(SmatError) as excinfo:
        import_smat_official(pmf_checkpoint, tmp_path / "m.pt", heads=HEADS)
    assert_one_line_error(excinfo, str(pmf_checkpoint), "smat import pmf")
    with pytest.raises(SmatError) as excinfo:
        import_pmf(smat_checkpoint, tmp_path / "m.pt", heads=HEADS)
    assert_one_line_error(excinfo, str(smat_checkpoint), "smat import smat-official")


def test_an_existing_out_is_replaced_atomically_and_kept_on_failure(tmp_path):
    checkpoint, extra, _, _ = official_smat_files(tmp_path)
    out = tmp_path / "models" / "model.pt"
    out.parent.mkdir()
    out.write_bytes(b"previous model")
    with pytest.raises(SmatError):
        import_smat_official(checkpoint, out, heads=HEADS)                 # no router tensors: fails
    assert out.read_bytes() == b"previous model"
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]          # no temporary file left behind
    import_smat_official(checkpoint, out, router_extra=extra, heads=HEADS)
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]
    assert load_trained(out, "cpu")[1]["method"] == "smat"


def test_cli_import_writes_a_model_and_reports_errors_in_one_line(tmp_path, capsys):
    checkpoint, extra, _, _ = official_smat_files(tmp_path)
    out = tmp_path / "model.pt"
    assert main(["import", "smat-official", str(checkpoint), "--router-extra", str(extra), "--heads", str(HEADS),
                 "--image-size", "8", "--out", str(out)]) == 0
    model, record = load_trained(out, "cpu")
    assert model.backbone.image_size == 8 and record["config"]["image_size"] == 8
    assert main(["import", "pmf", str(checkpoint), "--heads", str(HEADS), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("smat: error:") and "\n" not in error and str(checkpoint) in error


def test_smat_evaluate_takes_an_imported_model(tmp_path):
    """`smat evaluate --model` on an imported checkpoint, at an input size other than the table's grid."""
    from test_evaluation import build_store

    from smat.data.episodes import sample_to_file

    checkpoint, extra, _, _ = official_smat_files(tmp_path)
    model, episodes, results = tmp_path / "model.pt", tmp_path / "episodes.json", tmp_path / "eval" / "toy.csv"
    assert main(["import", "smat-official", str(checkpoint), "--router-extra", str(extra), "--heads", str(HEADS),
                 "--image-size", str(2 * PATCH), "--out", str(model)]) == 0
    store = build_store(tmp_path, "toy")
    sample_to_file(store, "test", n=2, seed=0, out=episodes, ways=3, shots=1, queries=2)
    assert main(["evaluate", "--model", str(model), "--episodes", str(episodes), "--store", str(store),
                 "--out", str(results), "--device", "cpu"]) == 0
    rows = results.read_text().splitlines()
    assert len(rows) == 3 and "smat" in rows[1]


def test_scale_factor_resampling_keeps_the_table_at_its_grid_and_the_class_token():
    table = torch.randn(1, 1 + 8 * 8, 6)
    assert resample_pos_embed_by_scale(table, 8, 8) is table
    small = resample_pos_embed_by_scale(table, 5, 5)
    assert small.shape == (1, 1 + 25, 6) and torch.equal(small[:, :1], table[:, :1])
    by_size = resample_abs_pos_embed(table, new_size=[5, 5], antialias=False)
    assert not torch.allclose(small, by_size)            # (5 + 0.1) / 8, not 5 / 8, sets the sampling points
