"""Episode samplers against the rules of METHOD §3.1 over many draws, hierarchies, episode files."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from smat.cli import main
from smat.config_loader import build_dataclass
from smat.data.episodes import SamplerConfig, load_episode_file, make_sampler, sample_episodes, sample_to_file
from smat.data.store import Store
from smat.io import SmatError, read_json, sha256_file, write_json


def synthetic_store(root, counts, splits=None, groups=None, dag=None, names=None):
    """A real store over tiny 2x2 images: classes with the given image counts (split "test" by default)."""
    root.mkdir(parents=True)
    names = names or [f"c{i:03d}" for i in range(len(counts))]
    splits = splits or ["test"] * len(counts)
    offsets = np.cumsum([0] + list(counts[:-1])).tolist()
    np.save(root / "images.npy", np.zeros((sum(counts), 2, 2, 3), dtype=np.uint8))
    write_json(root / "manifest.json", {
        "format": "smat-store/1", "domain": root.name, "image_size": 2,
        "hierarchy": "groups" if groups else "dag" if dag else "flat",
        "classes": [{"name": n, "split": s, "n_images": int(c), "offset": o, "group": g}
                    for n, s, c, o, g in zip(names, splits, counts, offsets, groups or [None] * len(counts))],
        "dag": dag, "excluded": [], "skipped_images": [],
        "images_sha256": sha256_file(root / "images.npy"), "source": "synthetic", "provenance": {},
    })
    return Store(root)


def draw(store, n, seed=0, config=SamplerConfig(), split="test", **fixed):
    sampler = make_sampler(store, split, config, **fixed)
    rng = np.random.default_rng(seed)
    return [sampler.sample(rng) for _ in range(n)]


def check_images(store, episode):
    for c, s, q in zip(episode.classes, episode.support, episode.query):
        ids = s + q
        assert len(set(ids)) == len(ids) and min(ids) >= 0 and max(ids) < store.classes[c].n_images


def test_variable_way_variable_shot_rules(tmp_path):
    rng = np.random.default_rng(1)
    counts = np.exp(rng.uniform(np.log(4), np.log(700), size=60)).astype(int).tolist()
    store = synthetic_store(tmp_path / "s", counts)
    n = np.array(counts)
    episodes = draw(store, 1500)
    ways = Counter(len(e.classes) for e in episodes)
    assert set(ways) == set(range(5, 51))  # uniform in [5, min(50, #classes)]: every value is drawn
    assert max(ways.values()) < 3 * min(ways.values())
    totals, correlations = [], []
    for e in episodes:
        assert len(set(e.classes)) == len(e.classes) and all(store.classes[c].split == "test" for c in e.classes)
        n_c = n[e.classes]
        q = min(10, (n_c // 2).min())
        assert all(len(query) == q for query in e.query)
        shots = np.array([len(s) for s in e.support])
        assert (shots >= 1).all() and (shots <= n_c - q).all()
        assert shots.sum() <= min(500, np.minimum(100, n_c - q).sum())
        check_images(store, e)
        totals.append(shots.sum())
        free = shots < n_c - q
        if free.sum() >= 5 and shots[free].std() > 0:
            correlations.append(np.corrcoef(np.log(n_c[free]), np.log(shots[free]))[0, 1])
    assert 450 <= max(totals) <= 500 and min(totals) < 50  # beta ~ U(0, 1) spans small to capped supports
    assert np.mean(correlations) > 0.3  # shots grow with class size (imbalanced, proportional to n_c)


def test_per_class_support_contribution_cap(tmp_path):
    store = synthetic_store(tmp_path / "s", [600] * 20)
    config = SamplerConfig(min_ways=5, max_ways=8, max_support=10_000)  # lift the 500 cap: only 100/class binds
    per_way = []
    for e in draw(store, 400, config=config):
        shots = [len(s) for s in e.support]
        assert all(len(q) == 10 for q in e.query)
        assert sum(shots) <= 100 * len(e.classes)
        per_way.append(sum(shots) / len(e.classes))
    assert max(per_way) > 95
    capped = [sum(len(s) for s in e.support) for e in draw(store, 400, seed=1)]
    assert max(capped) <= 500 and max(capped) > 450


def test_two_level_sampling_stays_in_one_group(tmp_path):
    groups = ["A"] * 12 + ["B"] * 7 + ["C"] * 3 + ["C"] * 6
    splits = ["test"] * 22 + ["train"] * 6
    store = synthetic_store(tmp_path / "s", [20] * 28, splits=splits, groups=groups)
    chosen = Counter()
    for e in draw(store, 600):
        (group,) = {store.classes[c].group for c in e.classes}
        chosen[group] += 1
        size = groups[:22].count(group)
        assert 5 <= len(e.classes) <= min(50, size)
    assert set(chosen) == {"A", "B"} and min(chosen.values()) > 240  # C has only 3 test classes: never eligible
    train = draw(store, 100, split="train")
    assert {len(e.classes) for e in train} == {5, 6}
    assert {(store.classes[c].group, store.classes[c].split) for e in train for c in e.classes} == {("C", "train")}


def test_dag_sampling_picks_leaves_of_one_eligible_node(tmp_path):
    names = [f"l{i}" for i in range(12)] + [f"t{i}" for i in range(6)]
    dag = {"root": ["animals", "plants"], "animals": ["mammals", "birds"], "mammals": ["l0", "l1", "l2"],
           "birds": ["l3", "l4", "l5", "l6"], "plants": ["flowers", "l9", "l10", "l11"] + names[12:],
           "flowers": ["l7", "l8"]}
    splits = ["test"] * 12 + ["train"] * 6
    store = synthetic_store(tmp_path / "s", [20] * 18, splits=splits, dag=dag, names=names)
    ids = {name: i for i, name in enumerate(names)}
    animals, plants = {ids[f"l{i}"] for i in range(7)}, {ids[f"l{i}"] for i in range(7, 12)}
    kinds = Counter()
    for e in draw(store, 600, config=SamplerConfig(max_ways=10)):
        classes = set(e.classes)
        assert len(classes) == len(e.classes)
        if classes == animals:
            kinds["animals"] += 1
        elif classes == plants:
            kinds["plants"] += 1
        else:  # the root spans all 12 test leaves: sub-sampled to max_ways
            assert len(classes) == 10 and classes <= animals | plants
            kinds["root"] += 1
    assert min(kinds.values()) > 150 and len(kinds) == 3  # uniform over the 3 eligible nodes
    sampler = make_sampler(store, "test")
    sums = [int(node.sum()) for node in sampler.classes.nodes]
    assert sums == sorted(sums)
    train = draw(store, 50, split="train")  # plants and root both span the 6 train leaves
    assert all(set(e.classes) == set(range(12, 18)) for e in train)


def test_fixed_way_shot_query_episodes_and_pool(tmp_path, caplog):
    store = synthetic_store(tmp_path / "s", [30] * 8 + [10, 3])
    with caplog.at_level(logging.WARNING):
        sampler = make_sampler(store, "test", ways=5, shots=1, queries=15)
    assert "2 class(es) with fewer than 16 images" in caplog.text
    assert sampler.describe()["dropped_classes"] == [8, 9]
    rng = np.random.default_rng(0)
    for _ in range(200):
        e = sampler.sample(rng)
        assert len(e.classes) == 5 and max(e.classes) < 8
        assert [len(s) for s in e.support] == [1] * 5 and [len(q) for q in e.query] == [15] * 5
        check_images(store, e)
    with pytest.raises(SmatError, match="only 8 candidate classes, fewer than the 9 ways"):
        make_sampler(store, "test", ways=9, shots=1, queries=15)


def test_fixed_shot_default_queries_and_fixed_way_variable_shot(tmp_path):
    store = synthetic_store(tmp_path / "s", [12, 40, 40, 40, 40, 40, 7])
    for e in draw(store, 100, ways=5, shots=5):
        n_c = np.array([store.classes[c].n_images for c in e.classes])
        assert [len(s) for s in e.support] == [5] * 5
        assert {len(q) for q in e.query} == {min(10, (n_c - 5).min())}
    for e in draw(store, 100, ways=6):
        n_c = np.array([store.classes[c].n_images for c in e.classes])
        q = min(10, (n_c // 2).min())
        assert len(e.classes) == 6 and all(len(query) == q for query in e.query)
        assert all(1 <= len(s) <= n - q for s, n in zip(e.support, n_c))


def test_sampler_errors(tmp_path):
    store = synthetic_store(tmp_path / "s", [20] * 4 + [20] * 6, splits=["val"] * 4 + ["test"] * 6)
    with pytest.raises(SmatError, match="split 'val': only 4 candidate classes"):
        make_sampler(store, "val")
    with pytest.raises(SmatError, match="unknown split 'dev'"):
        make_sampler(store, "dev")
    with pytest.raises(SmatError, match="need a fixed number of ways"):
        make_sampler(store, "test", shots=5)
    with pytest.raises(SmatError, match="min_ways"):
        build_dataclass(SamplerConfig, {"min_ways": 8, "max_ways": 5}, where="train.yaml:sampler")
    with pytest.raises(SmatError, match="max_support"):
        build_dataclass(SamplerConfig, {"max_support": 20}, where="train.yaml:sampler")


def test_episode_files_are_deterministic_and_round_trip(tmp_path):
    store = synthetic_store(tmp_path / "s", list(range(10, 40)))
    sample_to_file(store.root, "test", 30, seed=7, out=tmp_path / "a.json")
    sample_to_file(store.root, "test", 30, seed=7, out=tmp_path / "b.json")
    sample_to_file(store.root, "test", 30, seed=8, out=tmp_path / "c.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "c.json").read_bytes()
    episodes, header = load_episode_file(tmp_path / "a.json", store)
    assert episodes == sample_episodes(store, "test", 30, seed=7)
    assert header["store"] == {"domain": "s", "fingerprint": store.fingerprint} and header["seed"] == 7
    assert header["sampler"]["config"]["max_support"] == 500 and "episodes" not in header


def test_episode_file_must_match_its_store(tmp_path):
    store = synthetic_store(tmp_path / "s", [20] * 10, splits=["train"] * 2 + ["test"] * 8)
    other = synthetic_store(tmp_path / "other", [21] * 10, splits=["train"] * 2 + ["test"] * 8)
    path = tmp_path / "ep.json"
    sample_to_file(store.root, "test", 5, seed=0, out=path, ways=5, shots=2, queries=3)
    with pytest.raises(SmatError) as err:
        load_episode_file(path, other)
    assert str(path) in str(err.value) and str(other.root / "manifest.json") in str(err.value)
    assert "fingerprint" in str(err.value)

    data = read_json(path)
    for change, message in [
        (lambda d: d["episodes"][1]["classes"].__setitem__(0, 99), "class id 99 out of range"),
        (lambda d: d["episodes"][1]["classes"].__setitem__(0, 0), "is a train class, not a test class"),
        (lambda d: d["episodes"][2]["query"][0].__setitem__(0, 20), r"image ids must be distinct and in 0\.\.19"),
        (lambda d: d["episodes"][2]["support"].pop(), "one support and one query list each"),
        (lambda d: d.__setitem__("format", "something/2"), "not an episode file"),
    ]:
        broken = read_json(path)
        change(broken)
        write_json(tmp_path / "broken.json", broken)
        with pytest.raises(SmatError, match=message) as err:
            load_episode_file(tmp_path / "broken.json", store)
        assert str(tmp_path / "broken.json") in str(err.value)
    assert load_episode_file(path, store)[0][0].classes == data["episodes"][0]["classes"]


def test_cli_episodes_sample(tmp_path):
    store = synthetic_store(tmp_path / "s", [25] * 12)
    out = tmp_path / "episodes" / "test.json"
    assert main(["episodes", "sample", "--store", str(store.root), "--split", "test", "--n", "12", "--seed", "3",
                 "--ways", "5", "--shots", "1", "--queries", "15", "--out", str(out)]) == 0
    episodes, header = load_episode_file(out, store)
    assert len(episodes) == 12 and header["sampler"]["ways"] == 5
    assert main(["episodes", "sample", "--store", str(tmp_path / "nowhere"), "--split", "test",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
