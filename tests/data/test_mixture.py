"""Dataset mixtures: the DATASET grammar, the mixture read as one dataset, feature agreement, exact statistics, the
split per member, the weighted sampler, and the fingerprint check that names the member that changed."""

import json
import math

import numpy as np
import pytest

from fplus.data.lerobot import DataKeys, LeRobotDataset
from fplus.data.mixture import MixtureDataset, open_dataset, split_dataset
from fplus.data.split import Split, split_episodes
from fplus.data.stats import vector_stats
from fplus.data.writer import LeRobotWriter
from fplus.errors import ConfigError, DataError
from fplus.experiments import Experiment
from fplus.rundir import Run
from fplus.settings import DatasetMember, load_settings, parse_dataset
from fplus.train.data import EpochSampler, WeightedEpochSampler
from tests.helpers import CAM, toy_settings, write_toy_dataset

KEYS = DataKeys(image=CAM, state="observation.state", action="action", instruction="task")


def settings(**values):
    return load_settings(None, {k: str(v) for k, v in values.items()}, environ={}, dotenv=None)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two toy datasets (5 and 3 episodes, different values) and their mixture 0.7 / 0.3."""
    root = tmp_path_factory.mktemp("mix")
    a = write_toy_dataset(root / "a")
    b = write_toy_dataset(root / "b", lengths=(8, 14, 10), seed=1)
    s = toy_settings(root, root / "a", DATASET=f"{root / 'a'}:0.7,{root / 'b'}:0.3")
    return root, a, b, open_dataset(s.data, KEYS)


# ----- the DATASET grammar ----------------------------------------------------------------------------------------

def test_the_weight_is_the_number_after_the_last_colon_and_weights_are_normalised(tmp_path):
    assert parse_dataset("data/a:0.7,user/b:0.3") == (DatasetMember("data/a", 0.7), DatasetMember("user/b", 0.3))
    assert parse_dataset("x:1:3, y:v2:1") == (DatasetMember("x:1", 0.75), DatasetMember("y:v2", 0.25))
    assert parse_dataset("a,user/b") == (DatasetMember("a", 0.5), DatasetMember("user/b", 0.5))  # equal weights
    assert parse_dataset("user/b", "v1.0") == (DatasetMember("user/b", 1.0, "v1.0"),)  # one dataset: as before
    assert parse_dataset("data/a:2") == (DatasetMember("data/a", 1.0),)
    odd = tmp_path / "run:2,b"  # an existing directory is that dataset, colons and commas included
    odd.mkdir()
    assert parse_dataset(str(odd)) == (DatasetMember(str(odd), 1.0),)
    s = settings(DATASET="a:1,b:3")
    assert s.data.dataset == "a:1,b:3" and [m.weight for m in s.data.members()] == [0.25, 0.75]


@pytest.mark.parametrize(("dataset", "message"), [
    ("a:-1,b:1", "DATASET='a:-1,b:1' (from command line): the weight '-1' of 'a' is not a positive finite number"),
    ("a:0,b:1", "the weight '0' of 'a' is not a positive finite number"),
    ("a:inf,b:1", "the weight 'inf' of 'a' is not a positive finite number"),
    ("a:0.5,b", "'b' has no weight but others do: give every dataset a weight, or none"),
    ("a,,b", "an empty entry in the list of datasets"),
    ("a:0.5,a:0.5", "'a' is listed twice"),
    ("missing.yaml", "mixture file missing.yaml not found"),
])
def test_bad_dataset_lists_are_one_line_config_errors(dataset, message):
    with pytest.raises(ConfigError) as err:
        settings(DATASET=dataset)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_revision_belongs_to_one_dataset():
    with pytest.raises(ConfigError, match=r"DATASET_REVISION='v1' \(from command line\): the revision of one "
                                          r"dataset, but DATASET names 2 \(a,user/b\)"):
        settings(DATASET="a,user/b", DATASET_REVISION="v1")


def test_mixture_files_in_yaml_and_json(tmp_path):
    (tmp_path / "conf").mkdir()
    yaml_file = tmp_path / "conf" / "mix.yaml"
    yaml_file.write_text("datasets:\n  - path: ../data/a\n    weight: 3\n  - repo: user/b\n    revision: v2.0\n"
                         "    weight: 1\n")
    a = str(tmp_path / "data" / "a")  # relative to the file
    assert parse_dataset(str(yaml_file)) == (DatasetMember(a, 0.75), DatasetMember("user/b", 0.25, "v2.0"))
    json_file = tmp_path / "mix.json"
    json_file.write_text(json.dumps({"datasets": [{"path": "data/a"}, {"repo": "user/b"}]}))
    assert parse_dataset(str(json_file)) == (DatasetMember(a, 0.5), DatasetMember("user/b", 0.5))
    for body, message in [
        ({"datasets": [{"path": "a", "weight": -2}]}, "dataset 1: the weight -2 of"),
        ({"datasets": [{"path": "a", "repo": "u/b"}]}, "dataset 1: give exactly one of `path`"),
        ({"datasets": [{"path": "a", "revision": "v1"}]}, "only a hub dataset (`repo`) has one"),
        ({"datasets": [{"repo": "u/b", "wieght": 1}]}, "unknown key 'wieght'; valid keys: path, repo, weight"),
        ({"sets": []}, "expected one key `datasets`"),
    ]:
        json_file.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match="invalid settings: DATASET=") as err:
            settings(DATASET=json_file)
        assert message in str(err.value) and str(json_file) in str(err.value)


# ----- the mixture read as one dataset ----------------------------------------------------------------------------

def test_one_dataset_opens_exactly_as_before(two):
    root, a, *_ = two
    for spec in (root / "a", f"{root / 'a'}:1"):
        ds = open_dataset(toy_settings(root, root / "a", DATASET=spec).data, KEYS)
        assert type(ds) is LeRobotDataset and ds.fingerprint == a.fingerprint and ds.root == a.root


def test_the_mixture_reads_every_member_with_global_episodes_and_rows(two):
    _, a, b, mix = two
    assert isinstance(mix, MixtureDataset) and mix.weights == (0.7, 0.3)
    assert mix.num_episodes == 8 and mix.num_frames == a.num_frames + b.num_frames
    assert [e.index for e in mix.episodes] == list(range(8))
    e6, b1 = mix.episode(6), b.episode(1)
    assert (e6.start, e6.stop, e6.length) == (b1.start + a.num_frames, b1.stop + a.num_frames, b1.length)
    assert np.array_equal(mix.column("action"), np.concatenate([a.column("action"), b.column("action")]))
    assert np.array_equal(mix.episode_of_frames(), np.concatenate([a.episode_of_frames(), b.episode_of_frames() + 5]))
    assert np.array_equal(mix.column("index"), np.arange(mix.num_frames))
    assert list(mix.instructions("task")) == [*a.instructions("task"), *b.instructions("task")]
    assert mix.tasks == a.tasks and np.array_equal(np.asarray(mix.tasks)[mix.column("task_index")],
                                                   mix.instructions("task"))
    row = a.num_frames + 17
    assert np.array_equal(mix.frame_at(CAM, row), b.frame_at(CAM, 17))
    assert np.array_equal(mix.episode_frames(CAM, 6), b.episode_frames(CAM, 1))
    assert np.array_equal(mix.frames(CAM, np.array([row, 3])), np.stack([b.frame_at(CAM, 17), a.frame_at(CAM, 3)]))
    assert mix.member_of_episode(6) == (1, 1) and mix.member_of_rows(np.array([0, row])).tolist() == [0, 1]


def test_members_that_disagree_fail_listing_every_difference(two, tmp_path):
    root, *_ = two
    w = LeRobotWriter(tmp_path / "c", fps=20, features={
        CAM: {"dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [2], "names": ["u", "v"]},
        "action": {"dtype": "float32", "shape": [3], "names": ["dx", "dy", "dz"]}})
    w.add_episode("lift", {CAM: np.zeros((6, 32, 32, 3), np.uint8), "observation.state": np.zeros((6, 2), np.float32),
                           "action": np.zeros((6, 3), np.float32)})
    w.finalize()
    s = toy_settings(root, root / "a", DATASET=f"{root / 'a'},{tmp_path / 'c'}")
    with pytest.raises(DataError) as err:
        open_dataset(s.data, KEYS)
    text, c = str(err.value), tmp_path / "c"
    assert text.startswith("the datasets of the mixture do not fit the keys the run uses or do not agree: ")
    for difference in (f"{c}: fps 20 where {root / 'a'} has 10",
                       f"{c}: IMAGE_KEY='{CAM}' shape [32, 32, 3] where {root / 'a'} has [64, 64, 3]",
                       f"{c}: STATE_KEY='observation.state' names ['u', 'v'] where {root / 'a'} has ['x', 'y']",
                       f"{c}: ACTION_KEY='action' shape [3] where {root / 'a'} has [2]",
                       f"{c}: ACTION_KEY='action' names ['dx', 'dy', 'dz'] where {root / 'a'} has ['dx', 'dy']"):
        assert difference in text, difference
    assert text.count(";") == 4 and "\n" not in text
    mix = open_dataset(toy_settings(root, root / "a", DATASET=f"{root / 'a'},{root / 'b'}").data)  # no keys checked
    with pytest.raises(DataError, match=rf"{root / 'a'}: WRIST_IMAGE_KEY='nope' is not in the dataset; "
                                        rf"{root / 'b'}: WRIST_IMAGE_KEY='nope' is not in the dataset"):
        mix.validate_keys(DataKeys(image=CAM, wrist_image="nope", action="action"))
    with pytest.raises(DataError, match=rf"^the datasets of the mixture do not agree: {c}: fps 20 where"):
        open_dataset(toy_settings(root, root / "a", DATASET=f"{root / 'a'},{c}").data)  # fps, even without keys


def test_statistics_are_recomputed_exactly_from_the_concatenated_columns(two):
    _, a, b, mix = two
    for key in ("action", "observation.state"):
        pooled = np.concatenate([a.column(key), b.column(key)]).astype(np.float64)
        got = mix.stats[key]
        np.testing.assert_array_equal(got["min"], pooled.min(0))
        np.testing.assert_array_equal(got["max"], pooled.max(0))
        np.testing.assert_allclose(got["mean"], pooled.mean(0), rtol=1e-12)
        np.testing.assert_allclose(got["std"], pooled.std(0), rtol=1e-12)
        for name, q in (("q01", 0.01), ("q10", 0.1), ("q50", 0.5), ("q90", 0.9), ("q99", 0.99)):
            np.testing.assert_allclose(got[name], np.quantile(pooled, q, axis=0), rtol=1e-12)
        assert got["count"].tolist() == [a.num_frames + b.num_frames]
        # count-weighted, not mixture-weighted: the exact combination of the members' means and variances
        sa, sb = vector_stats(a.column(key)), vector_stats(b.column(key))
        na, nb = a.num_frames, b.num_frames
        mean = (na * sa["mean"] + nb * sb["mean"]) / (na + nb)
        var = (na * (sa["std"] ** 2 + (sa["mean"] - mean) ** 2) + nb * (sb["std"] ** 2 + (sb["mean"] - mean) ** 2))
        np.testing.assert_allclose(got["mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(got["std"], np.sqrt(var / (na + nb)), rtol=1e-12)
    state = mix.stats["observation.state"]
    per_member = (vector_stats(a.column("observation.state"))["q99"] + vector_stats(b.column("observation.state"))
                  ["q99"]) / 2
    assert not np.allclose(state["q99"], per_member), "quantiles are pooled, never averaged over members"


# ----- split and fingerprints -------------------------------------------------------------------------------------

def test_each_member_is_split_by_episode_with_the_split_seed(two, tmp_path):
    _, a, b, mix = two
    split = split_dataset(mix, 0.34, seed=5)
    own_a, own_b = split_episodes(list(range(5)), 0.34, 5), split_episodes(list(range(3)), 0.34, 5)
    assert [(m.train, m.val, m.episode_offset) for m in split.members] == [(own_a.train, own_a.val, 0),
                                                                          (own_b.train, own_b.val, 5)]
    assert split.train == tuple(sorted([*own_a.train, *(5 + e for e in own_b.train)]))
    assert split.val == tuple(sorted([*own_a.val, *(5 + e for e in own_b.val)]))
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == split
    assert json.loads((tmp_path / "split.json").read_text())["members"][1]["dataset"] == str(b.root)
    single = split_dataset(a, 0.34, seed=5)  # one dataset: split.json as before (no `members`)
    single.save(tmp_path / "one.json")
    assert single == own_a and set(json.loads((tmp_path / "one.json").read_text())) == {"train", "val", "seed",
                                                                                      "val_fraction"}
    with pytest.raises(DataError, match=rf"^{b.root}: cannot hold out 3 of 3 episodes for validation"):
        split_dataset(mix, 0.9, seed=0)


def test_reopening_names_the_member_whose_fingerprint_or_weight_changed(two, tmp_path):
    root, a, b, mix = two
    s = toy_settings(root, root / "a", DATASET=f"{root / 'a'}:0.7,{root / 'b'}:0.3")
    records = mix.member_records()
    assert [(r["dataset"], r["weight"], r["fingerprint"]) for r in records] == [
        (str(a.root), 0.7, a.fingerprint), (str(b.root), 0.3, b.fingerprint)]
    run = Run(tmp_path, {"dataset_fingerprint": mix.fingerprint, "dataset_members": records}, s, Experiment.of(s))
    run.check_dataset(mix.fingerprint, s.data.dataset, records)  # unchanged: accepted
    changed = [records[0], {**records[1], "fingerprint": "0123456789abcdef"}]
    with pytest.raises(DataError, match=rf"dataset 2 of the mixture, {b.root}, changed \(fingerprint "
                                        rf"0123456789abcdef != {b.fingerprint}\)"):
        run.check_dataset("other", s.data.dataset, changed)
    run.check_dataset("other", s.data.dataset, changed, content=False)  # resume: only the draws matter
    reweighted = [{**records[0], "weight": 0.5}, {**records[1], "weight": 0.5}]
    with pytest.raises(DataError, match=rf"dataset 1 of the mixture, {a.root}, has weight 0.5, the run was trained "
                                        r"with 0.7; dataset 2 .* has weight 0.5, the run was trained with 0.3"):
        run.check_dataset(mix.fingerprint, s.data.dataset, reweighted, content=False)
    with pytest.raises(DataError, match=r"trained on a mixture of 2 datasets .*, DATASET now names one"):
        run.check_dataset(a.fingerprint, str(a.root))
    single = Run(tmp_path, {"dataset_fingerprint": a.fingerprint}, s, Experiment.of(s))
    with pytest.raises(DataError, match="trained on one dataset, DATASET now names a mixture of 2"):
        single.check_dataset(mix.fingerprint, s.data.dataset, records)


# ----- the weighted sampler ---------------------------------------------------------------------------------------

GROUPS = np.repeat([0, 1, 2], [30, 200, 70])  # 300 samples: a small member, a large one, a middle one
WEIGHTS = (0.5, 0.2, 0.3)


def test_each_epoch_draws_every_member_in_proportion_to_its_weight():
    sampler = WeightedEpochSampler(GROUPS, WEIGHTS, seed=3, epoch=0)
    assert sampler.quotas().tolist() == [150, 60, 90] and len(sampler) == 300
    n, worst = 60, 0.0  # the first 60 draws (a few batches) of each of 20 epochs: within 4 binomial sigmas
    for epoch in range(20):
        order = np.array(list(WeightedEpochSampler(GROUPS, WEIGHTS, seed=3, epoch=epoch)))
        share = np.bincount(GROUPS[order], minlength=3) / len(order)
        assert np.abs(share - WEIGHTS).max() <= 1 / 300  # the whole epoch: the quotas, exactly
        first = np.bincount(GROUPS[order[:n]], minlength=3) / n
        sigma = np.sqrt(np.array(WEIGHTS) * (1 - np.array(WEIGHTS)) / n)
        worst = max(worst, float((np.abs(first - WEIGHTS) / sigma).max()))
        small = np.bincount(order[GROUPS[order] == 0], minlength=30)
        assert (small == 5).all(), "150 draws of 30 samples: every sample 5 times (with replacement, balanced)"
        assert len(set(order[GROUPS[order] == 1].tolist())) == 60, "60 draws of 200 samples: no repeats"
    assert worst < 4.0


def test_the_weighted_order_is_a_function_of_seed_and_epoch_and_shards_and_resumes():
    full = list(WeightedEpochSampler(GROUPS, WEIGHTS, seed=3, epoch=1))
    assert full == list(WeightedEpochSampler(GROUPS, WEIGHTS, seed=3, epoch=1))
    assert full != list(WeightedEpochSampler(GROUPS, WEIGHTS, seed=3, epoch=2))
    assert full != list(WeightedEpochSampler(GROUPS, WEIGHTS, seed=4, epoch=1))
    assert list(WeightedEpochSampler(GROUPS, WEIGHTS, seed=3, epoch=1, start=37)) == full[37:]
    shards = [list(WeightedEpochSampler(GROUPS[:299], WEIGHTS, 3, 1, rank=r, world=2)) for r in (0, 1)]
    order = WeightedEpochSampler(GROUPS[:299], WEIGHTS, 3, 1).order().tolist()
    padded = order + order[:1]
    assert len(shards[0]) == len(shards[1]) == 150 and shards[0] == padded[0::2] and shards[1] == padded[1::2]
    resumed = list(WeightedEpochSampler(GROUPS[:299], WEIGHTS, 3, 1, start=40, rank=1, world=2))
    assert resumed == shards[1][40:]
    assert EpochSampler(300, 3).per_process() == WeightedEpochSampler(GROUPS, WEIGHTS, 3).per_process()
    with pytest.raises(DataError, match="at least one sample per member"):
        WeightedEpochSampler(np.zeros(10, np.int64), WEIGHTS, 0)
    assert math.isclose(sum(WeightedEpochSampler(GROUPS, (7, 2, 1), 0).weights), 1.0)


def test_a_mixture_file_that_does_not_parse_is_named_with_its_format(tmp_path):
    for name, text, message in [("mix.json", '{"datasets": [', "is not valid JSON"),
                                ("mix.yaml", "datasets: [a, {path: b", "is not valid YAML")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match="invalid settings: DATASET=") as err:
            settings(DATASET=path)
        assert f"{path} {message}" in str(err.value) and len(str(err.value).splitlines()) == 1
