"""Analysis figures drawn from small synthetic result files: eval CSVs, training logs and expert masks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from PIL import Image

from smat.analysis.capacity import capacity_by_depth, capacity_by_type
from smat.analysis.dendrogram import mean_alpha
from smat.analysis.eval_results import read_eval_csvs
from smat.analysis.figures import make_figure
from smat.analysis.grad_alignment import alignment_table
from smat.analysis.mask_overlap import mask_iou
from smat.analysis.pareto import model_points, pareto_front
from smat.analysis.train_logs import describe_model, read_runs
from smat.evaluation.results import write_results
from smat.io import SmatError

ID, OOD = ["a", "b"], ["c", "d"]


def write_eval(path, label, method, accuracies, tau=None, experts=None, alphas=None):
    """An eval CSV written by `smat evaluate`'s writer: accuracies[dataset] = per-episode accuracies (%),
    alphas[dataset] = one router score vector per episode."""
    rows = [dict(label=label, model_id=f"{method}/{label}", method=method, mls=True, meta=True, dt=True, ie=True,
                 tau=tau, experts=experts, dataset=dataset, finetune="none", episode=episode, ways=5,
                 support_size=25, query_size=50, accuracy=accuracy, loss=0.7, lr=0.0, seconds=0.01,
                 alpha=alphas[dataset][episode] if alphas else None, config_hash="cafe", smat_version="0.1.0")
            for dataset, values in accuracies.items() for episode, accuracy in enumerate(values)]
    write_results(rows, path, extra={})
    return path


def write_run(model_dir, tau, experts=3, tasks=40, alignment=True):
    """A training log (and config.yaml) of a SMAT model."""
    model_dir.mkdir(parents=True)
    switches = {"mls": True, "meta": True, "dt": True, "ie": True}
    config = {"method": "smat", "experts": experts, "tau": tau, "switches": switches}    # as `smat train` writes
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(int(tau * 100))
    lines = []
    for task in range(0, tasks, 2):
        sparsity = list(np.clip(tau * (1 - np.exp(-task / 10)) + rng.normal(0, 0.01, experts), 0, 1))
        lines.append({"kind": "train", "task": task, "epoch": task // 10, "loss": 2.0 - task / tasks, "ce": 1.5,
                      "kd": 0.1, "acc": 0.5 + task / (4 * tasks), "lr": 1e-4, "temperature": 5.0,
                      "sparsity": sparsity, "lambda": [0.0] * experts, "alpha": [1 / experts] * experts})
        if alignment and task % 10 == 0:
            for group in ("delta", "merged"):
                lines.append({"kind": "grad_alignment", "task": task, "group": group,
                              "mean_cos": tau / 2 - task / 200, "n_pairs": 6})
        if task % 10 == 8:
            lines.append({"kind": "val", "epoch": task // 10, "acc": 60 + task / 4, "per_domain": {"a": 60.0}})
    log = model_dir / "train_log.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return log


def hand_made_masks():
    """Two blocks of a tiny ViT (width 2) with known non-zero counts per expert."""
    shapes = {"cls_token": (1, 1, 2), "pos_embed": (1, 3, 2), "patch_embed.proj.weight": (2, 3, 1, 1),
              "patch_embed.proj.bias": (2,), "norm.weight": (2,), "norm.bias": (2,)}
    for block in range(2):
        shapes.update({f"blocks.{block}.norm1.weight": (2,), f"blocks.{block}.attn.qkv.weight": (6, 2),
                       f"blocks.{block}.attn.proj.weight": (2, 2), f"blocks.{block}.mlp.fc1.weight": (8, 2),
                       f"blocks.{block}.mlp.fc2.weight": (2, 8), f"blocks.{block}.norm2.bias": (2,)})
    masks = {name: np.zeros((2, *shape), dtype=bool) for name, shape in shapes.items()}
    masks["cls_token"][0] = True                       # expert 0: 2 of the 2 + 6 + 6 + 2 = 16 embedding gates
    masks["blocks.0.attn.qkv.weight"][1, :3] = True    # expert 1: 6 of the 24 qkv gates, all in block 0
    masks["blocks.1.mlp.fc1.weight"][:, 0] = True      # both experts: 2 of the 32 fc1 gates, in block 1
    masks["norm.bias"][1, 1] = True                    # expert 1: 1 of the 2 + 2 + 2 + 2 + 2 + 2 = 12 norm gates
    return masks


def assert_png_and_pdf(prefix):
    png, pdf = prefix.with_name(prefix.name + ".png"), prefix.with_name(prefix.name + ".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000
    with Image.open(png) as image:
        record = json.loads(image.text["Description"])
        assert record["smat_version"] and record["inputs"][0]["sha256"]
        assert round(image.info["dpi"][0]) == 200


def test_pareto_front_on_hand_made_points():
    points = np.array([[1, 5], [2, 4], [2, 2], [3, 3], [0, 6], [3, 3], [1, 4], [4, 1], [4, 0.5]])
    assert list(pareto_front(points)) == [4, 0, 1, 3, 5, 7]
    assert list(pareto_front(np.array([[1.0, 1.0]]))) == [0]
    assert list(pareto_front(np.array([[1, 1], [2, 2], [3, 3]]))) == [2]


def test_mask_iou_on_hand_made_masks():
    masks = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=bool)
    iou = mask_iou(masks)
    assert iou.shape == (5, 5)
    assert iou[0, 1] == pytest.approx(1 / 3) and iou[1, 0] == pytest.approx(1 / 3)
    assert iou[0, 4] == 1.0 and iou[0, 2] == 0.0
    assert iou[2, 3] == 1.0                             # two empty masks are identical
    assert np.allclose(np.diag(iou), 1.0)
    assert mask_iou(masks.reshape(5, 2, 2))[0, 1] == pytest.approx(1 / 3)


def test_capacity_counts_by_layer_type_and_depth():
    by_type = capacity_by_type(hand_made_masks())
    assert list(by_type["group"].unique()) == ["embeddings", "qkv", "attention out", "MLP fc1", "MLP fc2", "norms"]
    counts = {(r.group, r.expert): (r.nonzero, r.total) for r in by_type.itertuples()}
    assert counts[("embeddings", 0)] == (2, 16) and counts[("embeddings", 1)] == (0, 16)
    assert counts[("qkv", 1)] == (6, 24) and counts[("qkv", 0)] == (0, 24)
    assert counts[("attention out", 0)] == (0, 8)
    assert counts[("MLP fc1", 0)] == (2, 32) and counts[("MLP fc1", 1)] == (2, 32)
    assert counts[("norms", 1)] == (1, 12)
    assert by_type[(by_type.group == "qkv") & (by_type.expert == 1)]["fraction"].item() == pytest.approx(0.25)

    by_depth = capacity_by_depth(hand_made_masks())
    depth = {(r.block, r.expert): (r.nonzero, r.total) for r in by_depth.itertuples()}
    per_block = 2 + 12 + 4 + 16 + 16 + 2
    assert depth == {(0, 0): (0, per_block), (0, 1): (6, per_block), (1, 0): (2, per_block), (1, 1): (2, per_block)}


@pytest.fixture
def sweep(tmp_path):
    """Eval CSVs of four SMAT models (τ × |M|) and Pre / PMF references, with known ID / OOD means."""
    rng = np.random.default_rng(0)
    paths, expected = [], {}
    for tau, experts, id_acc, ood_acc in [(0.5, 2, 80, 60), (0.9, 2, 78, 64), (0.9, 4, 77, 63), (0.99, 4, 70, 66)]:
        label = f"SMAT {tau} {experts}"
        accuracies = {d: list(id_acc + rng.normal(0, 1, 4)) for d in ID}
        accuracies.update({d: list(ood_acc + rng.normal(0, 1, 4)) for d in OOD})
        alphas = {d: [list(rng.dirichlet(np.ones(experts))) for _ in range(4)] for d in ID + OOD}
        paths.append(write_eval(tmp_path / f"{label}.csv", label, "smat", accuracies, tau, experts, alphas))
        expected[label] = tuple(np.mean([np.mean(accuracies[d]) for d in block]) for block in (ID, OOD))
    paths.append(write_eval(tmp_path / "pre.csv", "Pre", "pre", {d: [60.0, 62.0] for d in ID + OOD}))
    pmf = {**{d: [79.0] for d in ID}, **{d: [55.0] for d in OOD}}
    paths.append(write_eval(tmp_path / "pmf.csv", "PMF", "pmf", pmf))
    return paths, expected


def test_pareto_points_and_figure(tmp_path, sweep):
    paths, expected = sweep
    points = model_points(read_eval_csvs(paths), ID, OOD)
    for label, (id_mean, ood_mean) in expected.items():
        row = points[points["label"] == label].iloc[0]
        assert row["id"] == pytest.approx(id_mean) and row["ood"] == pytest.approx(ood_mean)
        assert 0 < row["id_ci95"] < 3 and 0 < row["ood_ci95"] < 3
    pre = points[points["label"] == "Pre"].iloc[0]          # [60, 62] on every dataset: CI 1.96·√2/√2 each
    assert pre["id_ci95"] == pytest.approx(1.96 * math.sqrt(len(ID)) / len(ID))
    assert math.isnan(points[points["label"] == "PMF"].iloc[0]["ood_ci95"])     # one episode: no CI
    front = set(points.iloc[pareto_front(points[["id", "ood"]].to_numpy())]["label"])
    assert front == {"SMAT 0.5 2", "SMAT 0.9 2", "SMAT 0.99 4"}        # PMF (79, 55) is dominated by (80, 60)

    make_figure("pareto", paths, tmp_path / "fig" / "pareto", ID, OOD)
    assert_png_and_pdf(tmp_path / "fig" / "pareto")
    write_eval(paths[-1], "PMF", "pmf", {d: [79.0] for d in ID + ["c"]})
    with pytest.raises(SmatError, match="model 'pmf/PMF'.*has no results for d"):
        make_figure("pareto", paths, tmp_path / "fig" / "pareto", ID, OOD)


def test_dendrogram_from_mean_router_scores(tmp_path):
    alphas = {"a": [[0.9, 0.1, 0.0], [0.7, 0.3, 0.0]], "b": [[0.8, 0.2, 0.0], [0.8, 0.2, 0.0]],
              "c": [[0.0, 0.2, 0.8], [0.0, 0.4, 0.6]], "d": [[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]}
    path = write_eval(tmp_path / "smat.csv", "SMAT", "smat", {d: [50.0, 60.0] for d in alphas}, 0.9, 3, alphas)
    vectors = mean_alpha(read_eval_csvs([path]))
    assert list(vectors.index) == ["a", "b", "c", "d"]
    assert np.allclose(vectors.loc["a"], [0.8, 0.2, 0.0]) and np.allclose(vectors.loc["c"], [0.0, 0.3, 0.7])

    make_figure("dendrogram", [path], tmp_path / "dendrogram", ID, OOD)
    assert_png_and_pdf(tmp_path / "dendrogram")

    with pytest.raises(SmatError, match="needs at least 2 datasets"):
        make_figure("dendrogram", [path], tmp_path / "one", ["a"], [])
    no_alpha = write_eval(tmp_path / "pmf.csv", "PMF", "pmf", {"a": [1.0], "b": [2.0]})
    with pytest.raises(SmatError, match="has no alpha"):
        make_figure("dendrogram", [no_alpha], tmp_path / "pmf", [], [])


def test_grad_alignment_and_curves_from_training_logs(tmp_path):
    low = write_run(tmp_path / "models" / "smat" / "tau~0.5" / "experts~3" / "seed~0", tau=0.5)
    high = write_run(tmp_path / "models" / "smat" / "tau~0.95" / "experts~3" / "seed~0", tau=0.95)
    table = alignment_table([high, low])
    assert list(table["model"].cat.categories) == ["SMAT τ=0.5 |M|=3", "SMAT τ=0.95 |M|=3"]   # ordered by τ
    assert set(table["group"]) == {"delta", "merged"} and len(table) == 2 * 2 * 4
    first = table[(table["model"] == "SMAT τ=0.95 |M|=3") & (table["group"] == "delta")].iloc[0]
    assert first["task"] == 0 and first["mean_cos"] == pytest.approx(0.475)

    make_figure("grad-alignment", [low, high], tmp_path / "grad_alignment", [], [])
    assert_png_and_pdf(tmp_path / "grad_alignment")
    make_figure("curves", [low, high], tmp_path / "curves", [], [])
    assert_png_and_pdf(tmp_path / "curves")
    make_figure("curves", [high], tmp_path / "curves_one", [], [])
    assert_png_and_pdf(tmp_path / "curves_one")

    silent = write_run(tmp_path / "models" / "pmf" / "seed~0", tau=0.0, alignment=False)
    with pytest.raises(SmatError, match="no 'grad_alignment' records"):
        make_figure("grad-alignment", [silent], tmp_path / "none", [], [])
    (tmp_path / "broken.jsonl").write_text('{"kind": "train"}\nnot json\n')
    with pytest.raises(SmatError, match="broken.jsonl:2: not a JSON object"):
        make_figure("curves", [tmp_path / "broken.jsonl"], tmp_path / "broken", [], [])


def test_model_description_for_legends(tmp_path):
    unknown = tmp_path / "smat" / "tau~0.7"          # folder names are not read: without config.yaml, unknown
    unknown.mkdir(parents=True)
    assert describe_model(unknown) == {"method": None, "tau": None, "experts": None, "switched_off": []}
    cases = [("pmf", {"mls": False}, (None, None, [])), ("softmerge", {"mls": False}, (None, 8, [])),
             ("smat", {"mls": False, "ie": False, "dt": True}, (None, 8, ["mls", "ie"])),
             ("smat", {"mls": True}, (0.9, 8, []))]
    logs = []
    for index, (method, switches, (tau, experts, off)) in enumerate(cases):
        model_dir = tmp_path / str(index) / method
        model_dir.mkdir(parents=True)
        (model_dir / "config.yaml").write_text(yaml.safe_dump(
            {"method": method, "experts": 8, "tau": 0.9, "switches": switches}))
        assert describe_model(model_dir) == {"method": method, "tau": tau, "experts": experts, "switched_off": off}
        logs.append(model_dir / "train_log.jsonl")
        logs[-1].write_text(json.dumps({"kind": "train", "task": 1, "ce": 1.0}) + "\n")
    logs.append(tmp_path / "seed" / "3" / "smat" / "train_log.jsonl")      # same model as logs[3], other folder
    logs[-1].parent.mkdir(parents=True)
    logs[-1].write_bytes(logs[3].read_bytes())
    (logs[-1].parent / "config.yaml").write_bytes((logs[3].parent / "config.yaml").read_bytes())
    assert [run.name for run in read_runs(logs)] == ["PMF", "SoftMerge |M|=8", "SMAT |M|=8 w/o MLS,IE",
                                                     "SMAT τ=0.9 |M|=8 (3/smat)", "SMAT τ=0.9 |M|=8 (seed/3/smat)"]


def test_capacity_and_mask_overlap_figures(tmp_path):
    model_dir = tmp_path / "smat" / "tau~0.9" / "experts~2" / "seed~0"
    model_dir.mkdir(parents=True)
    np.savez(model_dir / "expert_masks.npz", **hand_made_masks())
    masks = model_dir / "expert_masks.npz"
    make_figure("capacity", [masks], tmp_path / "capacity", [], [])
    assert_png_and_pdf(tmp_path / "capacity_type")
    assert_png_and_pdf(tmp_path / "capacity_depth")
    make_figure("mask-overlap", [masks], tmp_path / "mask_overlap", [], [])
    assert_png_and_pdf(tmp_path / "mask_overlap")

    with pytest.raises(SmatError, match="expected one expert_masks.npz, got 2"):
        make_figure("capacity", [masks, masks], tmp_path / "two", [], [])
    np.savez(tmp_path / "single.npz", w=np.ones((1, 3), dtype=bool))
    with pytest.raises(SmatError, match="only 1 expert"):
        make_figure("mask-overlap", [tmp_path / "single.npz"], tmp_path / "single", [], [])
    np.savez(tmp_path / "ragged.npz", a=np.ones((2, 3), dtype=bool), b=np.ones((3, 3), dtype=bool))
    with pytest.raises(SmatError, match="same leading dimension M"):
        make_figure("mask-overlap", [tmp_path / "ragged.npz"], tmp_path / "ragged", [], [])
    for prefix in ("two_type", "two_depth", "single", "ragged"):     # failed figures leave no files behind
        assert not list(tmp_path.glob(f"{prefix}.p*"))
