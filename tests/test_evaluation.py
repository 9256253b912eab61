"""`smat evaluate` / `smat select-lr` end to end on a tiny store, tiny episodes and the tiny ViT."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from smat.data.episodes import load_episode_file, sample_to_file
from smat.data.store import Store, convert_imagefolder
from smat.evaluation.evaluate import EpisodeRunner, evaluate, evaluate_many
from smat.evaluation.results import EVAL_COLUMNS
from smat.evaluation.select_lr import select_lr
from smat.config_loader import to_dict
from smat.io import SmatError, read_json, sha256_file, stable_hash
from smat.methods.pmf import PMF
from smat.methods.pre import Pre
from smat.methods.registry import build_model
from smat.models.backbones import create_backbone
from smat.models.pretrained import save_checkpoint
from smat.methods.checkpoint import save_model_checkpoint
from smat.training.config import TrainConfig

ARCH = "vit_tiny_patch4_32"
CPU = torch.device("cpu")


def build_store(root: Path, domain: str, n_classes: int = 6, n_images: int = 8, seed: int = 0) -> Path:
    """A converted store of coloured, striped 32-px images: each class has its own colour and stripe period."""
    rng = np.random.default_rng(seed)
    src = root / f"{domain}-raw"
    for c in range(n_classes):
        colour = rng.integers(40, 215, size=3)
        (src / f"class{c}").mkdir(parents=True)
        for i in range(n_images):
            yy, xx = np.mgrid[0:32, 0:32]
            stripes = ((xx + rng.integers(0, 8)) // (2 + c) % 2)[..., None] * 60
            pixels = np.clip(colour + stripes + rng.normal(0, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(src / f"class{c}" / f"{i}.png")
    out = root / domain
    convert_imagefolder(src, out, role="ood", domain=domain)
    return out


def build_pretrained(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    backbone = create_backbone(ARCH)
    save_checkpoint(path, ARCH, backbone.vit.state_dict(), source="test", sha256=None, meta={"image_size": 32})
    return path


def build_smat(seed: int = 0, experts: int = 2):
    """An SMAT model around the tiny ViT with a random (non-zero) shared delta, so tasks get distinct weights.

    Its config is kept as `model.config` for checkpoints written by the tests.
    """
    torch.manual_seed(seed)
    config = TrainConfig(method="smat", experts=experts)
    model = build_model(config, create_backbone(ARCH))
    with torch.no_grad():
        model.experts.delta.normal_(0, 0.02)
    model.config = config
    return model.eval()



@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("evaluation")
    store = build_store(root, "toy")
    other = build_store(root, "other", seed=1)
    episodes = root / "episodes.json"
    sample_to_file(store, "test", n=4, seed=3, out=episodes, ways=5, shots=2, queries=3)
    # 2-way 1-shot episodes keep the 50-step fine-tuning runs short.
    small = root / "small-episodes.json"
    sample_to_file(store, "test", n=2, seed=4, out=small, ways=2, shots=1, queries=2)
    other_small = root / "other-small-episodes.json"
    sample_to_file(other, "test", n=2, seed=5, out=other_small, ways=2, shots=1, queries=2)
    pretrained = build_pretrained(root / "tiny.pt")
    return SimpleNamespace(root=root, store=store, other=other, episodes=episodes, small=small,
                           other_small=other_small, pretrained=pretrained)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_csv_rows_and_summary(toy, tmp_path):
    out = tmp_path / "pre" / "toy.csv"
    summary = evaluate(f"pretrained:{toy.pretrained}", toy.episodes, toy.store, finetune="none", out=out,
                       device="cpu", progress=False)
    with open(out, newline="") as handle:
        assert next(csv.reader(handle)) == list(EVAL_COLUMNS)
    rows = read_csv(out)
    episodes, _ = load_episode_file(toy.episodes, Store(toy.store))
    assert [int(r["episode"]) for r in rows] == [0, 1, 2, 3]
    for row, episode in zip(rows, episodes):
        assert row["label"] == "Pre" and row["method"] == "pre" and row["dataset"] == "toy"
        assert row["finetune"] == "none" and float(row["lr"]) == 0.0
        assert int(row["ways"]) == 5 and int(row["support_size"]) == 10 and int(row["query_size"]) == 15
        assert all(row[k] == "" for k in ("mls", "meta", "dt", "ie", "tau", "experts", "alpha"))
        # accuracy is a percentage of 15 queries
        assert 0 <= float(row["accuracy"]) <= 100
        assert round(float(row["accuracy"]) * 15 / 100, 6) == round(float(row["accuracy"]) * 15 / 100)
        assert float(row["loss"]) > 0 and float(row["seconds"]) > 0
        assert row["model_id"] == f"pre-{sha256_file(toy.pretrained)[:12]}"
    accuracies = [float(r["accuracy"]) for r in rows]
    saved = read_json(out.with_suffix(".json"))
    assert saved["mean"] == pytest.approx(np.mean(accuracies))
    assert saved["ci95"] == pytest.approx(1.96 * np.std(accuracies, ddof=1) / math.sqrt(4))
    assert saved["n"] == 4 and summary["n"] == 4
    assert saved["seconds_per_episode"] > 0
    assert saved["provenance"]["episodes_sha256"] == sha256_file(toy.episodes)
    assert saved["provenance"]["model_sha256"] == sha256_file(toy.pretrained)
    assert "smat_version" in saved["provenance"]
    # --limit and --label
    limited = tmp_path / "limited.csv"
    evaluate(f"pretrained:{toy.pretrained}", toy.episodes, toy.store, label="DINO", limit=2, out=limited,
             device="cpu", progress=False)
    rows_limited = read_csv(limited)
    assert [r["label"] for r in rows_limited] == ["DINO", "DINO"]
    assert [r["accuracy"] for r in rows_limited] == [r["accuracy"] for r in rows[:2]]


@pytest.mark.parametrize("method", ["pre", "pmf"])
def test_feature_cache_gives_identical_results(toy, method):
    store = Store(toy.store)
    episodes, meta = load_episode_file(toy.episodes, store)
    torch.manual_seed(0)
    backbone = create_backbone(ARCH)
    model = (Pre(backbone) if method == "pre" else PMF(backbone)).eval()
    cached = EpisodeRunner(model, store, "none", CPU).run(episodes, range(4), meta["seed"], 0.0, progress=False)
    direct = EpisodeRunner(model, store, "none", CPU, use_cache=False).run(episodes, range(4), meta["seed"], 0.0,
                                                                           progress=False)
    assert [r["accuracy"] for r in cached] == [r["accuracy"] for r in direct]
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in direct], rel=1e-5, abs=1e-6)


def test_smat_checkpoint_rows_carry_switches_and_router_scores(toy, tmp_path):
    model = build_smat()
    checkpoint = tmp_path / "best.pt"
    save_model_checkpoint(checkpoint, model, to_dict(model.config), {"arch": ARCH, "image_size": 32,
                                                                    "pretrained_sha256": None}, progress={})
    out = tmp_path / "smat.csv"
    evaluate(str(checkpoint), toy.episodes, toy.store, limit=2, out=out, device="cpu", progress=False)
    rows = read_csv(out)
    assert len(rows) == 2
    for row in rows:
        assert (row["label"], row["method"]) == ("SMAT", "smat")
        assert [row[k] for k in ("mls", "meta", "dt", "ie")] == ["true"] * 4
        assert float(row["tau"]) == 0.9 and int(row["experts"]) == 2
        assert row["config_hash"] == stable_hash(to_dict(model.config))
        alpha = json.loads(row["alpha"])
        assert len(alpha) == 2 and sum(alpha) == pytest.approx(1.0, abs=1e-5)
    # The router reads the support: different episodes, different scores.
    assert rows[0]["alpha"] != rows[1]["alpha"]


def test_lr_zero_is_exactly_no_finetuning(toy, tmp_path):
    # Task-dependent model (no feature cache involved): lr 0 must reproduce "none" bit for bit.
    store = Store(toy.store)
    episodes, meta = load_episode_file(toy.episodes, store)
    model = build_smat()
    none = EpisodeRunner(model, store, "none", CPU).run(episodes[:2], range(2), meta["seed"], 0.0, progress=False)
    for finetune in ("full", "lora"):
        zero = EpisodeRunner(model, store, finetune, CPU).run(episodes[:2], range(2), meta["seed"], 0.0,
                                                              progress=False)
        assert [(r["accuracy"], r["loss"]) for r in zero] == [(r["accuracy"], r["loss"]) for r in none]
    # Through the command: --finetune full --lr 0 gives the rows of --finetune none.
    a, b = tmp_path / "none.csv", tmp_path / "zero.csv"
    evaluate(f"pretrained:{toy.pretrained}", toy.episodes, toy.store, out=a, device="cpu", progress=False)
    evaluate(f"pretrained:{toy.pretrained}", toy.episodes, toy.store, finetune="full", lr=0.0, out=b,
             device="cpu", progress=False)
    assert [(r["accuracy"], r["loss"]) for r in read_csv(a)] == [(r["accuracy"], r["loss"]) for r in read_csv(b)]
    assert {r["finetune"] for r in read_csv(b)} == {"full"}


def test_select_lr_writes_scores_and_evaluate_reads_it(toy, tmp_path):
    lr_file = tmp_path / "lr.json"
    best = select_lr(f"pretrained:{toy.pretrained}", toy.small, toy.store, finetune="full", grid=[0.0, 1e-4],
                     n_episodes=1, out=lr_file, device="cpu", progress=False)
    record = read_json(lr_file)
    assert record["dataset"] == "toy" and record["finetune"] == "full" and record["n_episodes"] == 1
    assert record["grid"] == [0.0, 1e-4] and set(record["scores"]) == {"0.0", "0.0001"}
    assert record["best_lr"] == best
    scores = [record["scores"]["0.0"], record["scores"]["0.0001"]]
    assert best == (1e-4 if scores[1] > scores[0] else 0.0)
    assert "provenance" in record
    out = tmp_path / "full.csv"
    evaluate(f"pretrained:{toy.pretrained}", toy.small, toy.store, finetune="full", lr_from=lr_file, limit=1,
             out=out, device="cpu", progress=False)
    row = read_csv(out)[0]
    assert float(row["lr"]) == best
    assert float(row["accuracy"]) == pytest.approx(record["scores"][str(best)])
    # The lr file must fit the evaluation.
    with pytest.raises(SmatError, match="finetune is 'full'"):
        evaluate(f"pretrained:{toy.pretrained}", toy.episodes, toy.store, finetune="lora", lr_from=lr_file,
                 out=tmp_path / "x.csv", device="cpu", progress=False)
    assert not (tmp_path / "x.csv").exists()
    other_model = build_pretrained(tmp_path / "other.pt", seed=1)            # ... and the model it was chosen for
    with pytest.raises(SmatError, match=r"selected for model pre-[0-9a-f]{12}, not for this model"):
        evaluate(f"pretrained:{other_model}", toy.small, toy.store, finetune="full", lr_from=lr_file,
                 out=tmp_path / "y.csv", device="cpu", progress=False)
    assert not (tmp_path / "y.csv").exists()


def test_diverged_finetuning_is_an_error_in_evaluate_and_a_loser_in_select_lr(toy, tmp_path):
    """Non-finite logits must never become a number in a table (argmax of NaN picks a class: chance)."""
    model = f"pretrained:{toy.pretrained}"
    out = tmp_path / "diverged.csv"
    with pytest.raises(SmatError, match=r"non-finite logits on toy episode\(s\) \[0\].*lr 1e\+30"):
        evaluate(model, toy.small, toy.store, finetune="full", lr=1e30, limit=1, out=out, device="cpu",
                 progress=False)
    assert not out.exists() and not out.with_suffix(".json").exists()
    lr_file = tmp_path / "lr.json"
    assert select_lr(model, toy.small, toy.store, finetune="full", grid=[1e30, 0.0], n_episodes=1, out=lr_file,
                     device="cpu", progress=False) == 0.0
    record = read_json(lr_file)
    assert record["scores"]["1e+30"] is None and record["best_lr"] == 0.0
    with pytest.raises(SmatError, match="diverged .* at every learning rate"):
        select_lr(model, toy.small, toy.store, finetune="full", grid=[1e30], n_episodes=1,
                  out=tmp_path / "never.json", device="cpu", progress=False)
    assert not (tmp_path / "never.json").exists()


def test_one_checkpoint_evaluates_at_its_size_and_at_another(toy, tmp_path):
    """A 224-px set and a 128-px set in the paper; here 32 px (the model's) and 48 px, in one call."""
    model = build_smat()
    checkpoint = tmp_path / "best.pt"
    save_model_checkpoint(checkpoint, model, to_dict(model.config), {"arch": ARCH, "image_size": 32,
                                                                     "pretrained_sha256": "0" * 64},
                          {"tasks_seen": 0})
    native, large = tmp_path / "native.csv", tmp_path / "large.csv"
    evaluate_many(str(checkpoint), [toy.small, toy.small], [toy.store, toy.store], [native, large],
                  image_sizes=[None, 48], device="cpu", progress=False)
    assert read_json(native.with_suffix(".json"))["provenance"]["image_size"] == 32
    assert read_json(large.with_suffix(".json"))["provenance"]["image_size"] == 48
    alone = tmp_path / "alone.csv"
    evaluate(str(checkpoint), toy.small, toy.store, out=alone, device="cpu", progress=False)
    assert without_timing(read_csv(native)) == without_timing(read_csv(alone))    # same outputs at 32 px
    assert [r["accuracy"] for r in read_csv(large)] != [] and len(read_csv(large)) == len(read_csv(native))
    with pytest.raises(SmatError, match="--image-size 50 for toy: not a multiple of the backbone's 4-px patches"):
        evaluate_many(str(checkpoint), [toy.small], [toy.store], [tmp_path / "x.csv"], image_sizes=[50],
                      device="cpu", progress=False)


def test_bad_inputs_are_clear_errors_and_write_nothing(toy, tmp_path):
    out = tmp_path / "bad.csv"
    model = f"pretrained:{toy.pretrained}"

    def fails(match, **kwargs):
        args = dict(model_spec=model, episodes_path=toy.episodes, store_path=toy.store, out=out, device="cpu",
                    progress=False)
        args.update(kwargs)
        with pytest.raises(SmatError, match=match):
            evaluate(**args)
        assert not out.exists() and not out.with_suffix(".json").exists()
        assert not list(tmp_path.glob(".*.tmp"))

    fails("sampled from store 'toy'", store_path=toy.other)                 # episodes of another store
    fails("either --lr or --lr-from", finetune="full", lr=1e-3, lr_from=tmp_path / "lr.json")
    fails("needs a learning rate", finetune="lora")
    fails("need --finetune full or lora", lr=1e-3)
    fails("must be a finite number >= 0", finetune="full", lr=-1.0)
    fails("not found", model_spec=f"pretrained:{tmp_path / 'missing.pt'}")
    unknown = tmp_path / "maml.pt"
    torch.save({"format": "smat-model/1", "method": "maml", "config": {}, "state_dict": {}}, unknown)
    fails("unknown method 'maml'", model_spec=str(unknown))
    not_a_model = tmp_path / "junk.pt"
    not_a_model.write_bytes(b"not a checkpoint")
    fails("not a readable model checkpoint", model_spec=str(not_a_model))
    with pytest.raises(SmatError, match="grid is empty"):
        select_lr(model, toy.episodes, toy.store, finetune="full", grid=[], out=tmp_path / "lr.json", device="cpu")
    assert not (tmp_path / "lr.json").exists()


def test_lora_needs_attention_projections(toy):
    torch.manual_seed(0)
    backbone = create_backbone(ARCH)
    for block in backbone.vit.blocks:
        block.attn.qkv = torch.nn.Identity()    # a ViT variant without the fused q/k/v Linear
    with pytest.raises(SmatError, match="attention projections"):
        EpisodeRunner(Pre(backbone), Store(toy.store), "lora", CPU)


def test_cli_evaluate_and_compare(toy, tmp_path, capsys):
    from smat.cli import main

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for out, label in ((a, "A"), (b, "B")):
        code = main(["evaluate", "--model", f"pretrained:{toy.pretrained}", "--episodes", str(toy.episodes),
                     "--store", str(toy.store), "--label", label, "--out", str(out), "--device", "cpu"])
        assert code == 0
    assert main(["compare", str(a), str(b)]) == 0
    assert "B minus A: +0.00" in capsys.readouterr().out
    assert main(["evaluate", "--model", f"pretrained:{toy.pretrained}", "--episodes", str(toy.episodes),
                 "--store", str(toy.other), "--out", str(tmp_path / "c.csv"), "--device", "cpu"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert json.loads(a.with_suffix(".json").read_text())["label"] == "A"


def without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


@pytest.mark.parametrize("finetune", [[], ["--finetune", "lora", "--lr", "1e-3", "--limit", "1"]],
                         ids=["none", "lora"])
def test_cli_evaluate_two_datasets_in_one_call_equals_two_calls(toy, tmp_path, finetune):
    """One call on two datasets (the model loaded once, LoRA's backbone copy shared) writes what two
    single-dataset calls write."""
    from smat.cli import main

    common = ["evaluate", "--model", f"pretrained:{toy.pretrained}", "--device", "cpu", *finetune]
    pairs = [(toy.small, toy.store), (toy.other_small, toy.other)]
    singles = [tmp_path / "single" / f"{i}.csv" for i in range(2)]
    for (episodes, store), out in zip(pairs, singles):
        assert main([*common, "--episodes", str(episodes), "--store", str(store), "--out", str(out)]) == 0
    both = [tmp_path / "both" / f"{i}.csv" for i in range(2)]
    assert main([*common, "--episodes", str(toy.small), str(toy.other_small), "--store", str(toy.store),
                 str(toy.other), "--out", *map(str, both)]) == 0
    for single, multi in zip(singles, both):
        assert without_timing(read_csv(multi)) == without_timing(read_csv(single))
        one, many = read_json(single.with_suffix(".json")), read_json(multi.with_suffix(".json"))
        assert {k: many[k] for k in ("dataset", "mean", "ci95", "n", "episodes_file")} == \
               {k: one[k] for k in ("dataset", "mean", "ci95", "n", "episodes_file")}
        for key in ("episodes_sha256", "model_sha256", "store_fingerprint", "episodes_seed"):
            assert many["provenance"][key] == one["provenance"][key]
    assert [read_csv(out)[0]["dataset"] for out in both] == ["toy", "other"]


def test_cli_select_lr_two_datasets_with_their_own_grids(toy, tmp_path, monkeypatch):
    from smat.cli import main

    monkeypatch.setattr("smat.evaluation.select_lr.DEFAULT_GRID", (0.0,))     # `default`, without 6 fine-tunings
    common = ["select-lr", "--model", f"pretrained:{toy.pretrained}", "--finetune", "full", "--n-episodes", "1",
              "--device", "cpu"]
    grids = [["0", "1e-4"], ["default"]]
    pairs = [(toy.small, toy.store), (toy.other_small, toy.other)]
    singles = [tmp_path / f"single-{i}.json" for i in range(2)]
    for (episodes, store), grid, out in zip(pairs, grids, singles):
        assert main([*common, "--episodes", str(episodes), "--store", str(store), "--grid", *grid,
                     "--out", str(out)]) == 0
    both = [tmp_path / f"both-{i}.json" for i in range(2)]
    assert main([*common, "--episodes", str(toy.small), str(toy.other_small), "--store", str(toy.store),
                 str(toy.other), "--grid", *grids[0], "--grid", *grids[1], "--out", *map(str, both)]) == 0
    for single, multi in zip(singles, both):
        one, many = read_json(single), read_json(multi)
        assert {k: v for k, v in many.items() if k != "provenance"} == \
               {k: v for k, v in one.items() if k != "provenance"}
    assert [read_json(out)["grid"] for out in both] == [[0.0, 1e-4], [0.0]]


@pytest.mark.parametrize("args, named", [
    (["--store", "{store}", "--out", "{out}"], "2 --episodes, 1 --store and 1 --out"),
    (["--store", "{store}", "{other}", "--out", "{out}", "{out}"], "--out {out} is given twice"),
    (["--store", "{store}", "{other}", "--out", "{out}", "{out2}", "--finetune", "full", "--lr-from", "{lr}"],
     "--lr-from: got 1 file(s) for 2 --episodes"),
])
def test_cli_evaluate_mismatched_datasets_are_one_line_errors_and_write_nothing(toy, tmp_path, capsys, args,
                                                                                named):
    from smat.cli import main

    values = {"store": toy.store, "other": toy.other, "out": tmp_path / "a.csv", "out2": tmp_path / "b.csv",
              "lr": tmp_path / "lr.json"}
    argv = ["evaluate", "--model", f"pretrained:{toy.pretrained}", "--episodes", str(toy.small),
            str(toy.other_small), *(arg.format(**values) for arg in args), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named.format(**values) in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_cli_select_lr_mismatched_datasets_and_grids_are_one_line_errors(toy, tmp_path, capsys):
    from smat.cli import main

    common = ["select-lr", "--model", f"pretrained:{toy.pretrained}", "--finetune", "full", "--device", "cpu",
              "--episodes", str(toy.small), str(toy.other_small)]
    cases = [
        (["--store", str(toy.store), "--out", str(tmp_path / "a.json")], "2 --episodes, 1 --store and 1 --out"),
        (["--store", str(toy.store), str(toy.other), "--out", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
          "--grid", "0", "--grid", "0", "--grid", "0"], "--grid: given 3 times for 2 --episodes"),
        (["--store", str(toy.store), str(toy.other), "--out", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
          "--grid", "0", "fast"], "--grid 0 fast: give learning rates"),
    ]
    for args, named in cases:
        assert main([*common, *args]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_cli_evaluate_bad_second_dataset_fails_before_the_first_is_evaluated(toy, tmp_path, capsys):
    from smat.cli import main

    lr_file = tmp_path / "lr.json"
    select_lr(f"pretrained:{toy.pretrained}", toy.small, toy.store, finetune="full", grid=[0.0], n_episodes=1,
              out=lr_file, device="cpu", progress=False)
    outs = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    common = ["evaluate", "--model", f"pretrained:{toy.pretrained}", "--store", str(toy.store), str(toy.other),
              "--out", *outs, "--device", "cpu"]
    cases = [
        (["--episodes", str(toy.small), str(tmp_path / "missing.json")], "missing.json: file not found"),
        (["--episodes", str(toy.small), str(toy.other_small), "--finetune", "full", "--lr-from", str(lr_file),
          str(tmp_path / "missing-lr.json")], "missing-lr.json: file not found"),
    ]
    for args, named in cases:
        assert main([*common, *args]) == 2
        assert named in capsys.readouterr().err
        assert not any(Path(out).exists() for out in outs)
