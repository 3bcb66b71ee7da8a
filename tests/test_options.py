"""Issue 22 (1): each `hnal score` option is declared once (`ScoreConfig`, with its help, choices
and default) and reaches the command line, the Python API, the loop's strategies and the run key."""
import dataclasses

import numpy as np
import pytest

import hnal_ray
from helpers import write_inputs
from hnal_ray.cli import build_parser
from hnal_ray.config import ConfigError, ScoreConfig
from hnal_ray.loop.config import StrategyConfig

# a valid value other than the default for every field
OTHER = {"budget": 5, "strategy": "cluster", "weight": "counting", "k": 2, "threshold_batch": 8, "side": "text",
         "seed": 7, "shards": 3, "shard_rows": 11, "stream_rows": 13, "address": "ray://h:1", "device": "cpu",
         "block_pool": 17, "block_anchor": 19, "clusters": 23, "quota": "uncovered", "within": "typical",
         "cluster_sample": 29, "max_points_per_centroid": 31, "fit_iters": 3, "max_clusters": 37,
         "min_cluster_size": 4, "typical_cap": 41, "wait": True, "candidates": 43, "support": 47, "purity": 0.5,
         "bandwidth": 0.25, "precision": "bf16"}


def test_every_field_has_help_a_test_value_and_reaches_the_command_line():
    fields = {f.name: f for f in dataclasses.fields(ScoreConfig)}
    assert set(fields) == set(OTHER), "a new ScoreConfig field needs a value here"
    assert all(f.metadata.get("help") for f in fields.values())
    argv = ["score", "--paired-images", "a", "--paired-texts", "b", "--pool", "c", "--out", "o"]
    for name, value in OTHER.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
        assert value != fields[name].default, name
    a = build_parser().parse_args(argv)
    assert ScoreConfig(**{n: getattr(a, n) for n in OTHER}) == ScoreConfig(**OTHER)
    defaults = build_parser().parse_args(["score", "--paired-images", "a", "--paired-texts", "b", "--pool", "c",
                                          "--out", "o", "--budget", "5"])
    assert ScoreConfig(**{n: getattr(defaults, n) for n in OTHER}) == ScoreConfig(budget=5)
    choices = {f.name: f.metadata["choices"] for f in fields.values() if f.metadata.get("choices")}
    with pytest.raises(SystemExit):  # a value outside the declared choices is argparse's error
        build_parser().parse_args(argv[:-2] + ["--precision", "fp64"])
    assert choices["strategy"] == hnal_ray.config.STRATEGIES


def test_the_api_takes_every_field_and_refuses_others(tmp_path):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(3), n_pool=30)
    opts = dict(weight="counting", k=2, seed=7, block_pool=17, block_anchor=19, stream_rows=5, shard_rows=11,
                precision="bf16", candidates=43)
    res = hnal_ray.select(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"]), 5,
                          out=tmp_path / "out", **opts)
    assert res.summary["config"] == dataclasses.asdict(ScoreConfig(budget=5, **opts))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['kk'\]"):
        hnal_ray.select(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"]), 5, kk=2)


def test_loop_strategies_share_the_declarations():
    """A strategy's score options have ScoreConfig's defaults, and each one set in YAML reaches the round's ScoreConfig."""
    shared = [f.name for f in dataclasses.fields(StrategyConfig) if f.name in OTHER]
    assert len(shared) >= 12
    for name in shared:
        assert StrategyConfig.__dataclass_fields__[name].default == ScoreConfig.__dataclass_fields__[name].default, name
    s = StrategyConfig(name="x", strategy="cluster", weight="counting", k=2, threshold_batch=8, side="image",
                       clusters=23, quota="uncovered", within="typical", max_clusters=37, min_cluster_size=4,
                       support=47, purity=0.5, bandwidth=0.25)
    cfg = s.score_config(budget=5, seed=1, shards=0)
    for name in shared:
        assert getattr(cfg, name) == getattr(s, name), name
