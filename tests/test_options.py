"""Issue 22 (1): each `hnal score` option is declared once (`ScoreConfig`, with its help, choices
and default) and reaches the command line, the Python API, the loop's strategies and the run key;
each training option (`TrainConfig`, `ModelConfig`) reaches `hnal train` and the run YAML."""
import dataclasses

import numpy as np
import pytest
import yaml

import hnal_ray
from helpers import write_inputs
from hnal_ray.cli import build_parser
from hnal_ray.config import ConfigError, ModelConfig, ScoreConfig, ScoreInputs, TrainConfig
from hnal_ray.loop.config import LOOP_SETS, StrategyConfig, load_loop_config
from hnal_ray.score.job import run_key

# a valid value other than the default for every field
OTHER = {"budget": 5, "strategy": "cluster", "weight": "counting", "k": 2, "threshold_batch": 8, "side": "text",
         "seed": 7, "shards": 3, "shard_rows": 11, "stream_rows": 13, "address": "ray://h:1", "device": "cpu",
         "block_pool": 17, "block_anchor": 19, "clusters": 23, "quota": "uncovered", "within": "typical",
         "cluster_sample": 29, "max_points_per_centroid": 31, "fit_iters": 3, "max_clusters": 37,
         "min_cluster_size": 4, "typical_cap": 41, "wait": True, "candidates": 43, "support": 47, "purity": 0.5,
         "bandwidth": 0.25, "precision": "bf16"}
# options whose other value goes with defaults of the ones above (--method pruned computes in fp32)
ALSO = {"method": "pruned"}


def test_every_field_has_help_a_test_value_and_reaches_the_command_line():
    fields = {f.name: f for f in dataclasses.fields(ScoreConfig)}
    assert set(fields) == set(OTHER) | set(ALSO), "a new ScoreConfig field needs a value here"
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
    for name, value in ALSO.items():
        assert value != fields[name].default and getattr(build_parser().parse_args(
            argv[:9] + ["--budget", "5", "--" + name.replace("_", "-"), value]), name) == value


def test_the_api_takes_every_field_and_refuses_others(tmp_path):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(3), n_pool=30)
    opts = dict(weight="counting", k=2, seed=7, block_pool=17, block_anchor=19, stream_rows=5, shard_rows=11,
                precision="bf16", candidates=43)
    res = hnal_ray.select(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"]), 5,
                          out=tmp_path / "out", **opts)
    assert res.summary["config"] == dataclasses.asdict(ScoreConfig(budget=5, **opts))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['kk'\]"):
        hnal_ray.select(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"]), 5, kk=2)


def test_loop_strategies_share_the_declarations(tmp_path):
    """Every score option the loop does not set itself is a strategy key in the run YAML, with
    ScoreConfig's default, and a value set there reaches the round's ScoreConfig."""
    fields = {f.name: f for f in dataclasses.fields(StrategyConfig)}
    assert set(OTHER) - set(LOOP_SETS) <= set(fields)
    for name in set(OTHER) - set(LOOP_SETS):
        assert fields[name].default == ScoreConfig.__dataclass_fields__[name].default, name
    mine = {n: v for n, v in OTHER.items() if n not in LOOP_SETS}
    assert set(ALSO) <= set(fields)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "data": "d", "features": "f", "budget": 5,
        "strategies": [{"name": "x", **mine}, {"name": "y", "strategy": "random", "switch_at": 10,
                                                "then": {"strategy": "probcover", "purity": 0.5}}]}))
    cfg = load_loop_config(tmp_path / "run.yaml")
    got = cfg.strategies[0].score_config(budget=5, seed=7, shards=3)
    assert got == ScoreConfig(**{**OTHER, "address": None, "wait": False})
    later = cfg.strategies[1].score_config(budget=5, seed=0, shards=0, paired_images=10)
    assert (later.strategy, later.purity) == ("probcover", 0.5)
    assert cfg.strategies[1].score_config(budget=5, seed=0, shards=0, paired_images=9).strategy == "random"


def test_the_run_key_holds_exactly_the_fields_declared_to_decide_the_outputs(tmp_path):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(3), n_pool=30)
    inputs = ScoreInputs(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"]))
    for strategy in ("cluster", "probcover"):
        base = ScoreConfig(budget=6, strategy=strategy, quota="uncovered", within="typical")
        key = run_key(inputs, base)
        for name, value in (OTHER | ALSO).items():
            if name in ("strategy", "within", "quota"):
                continue
            changed = run_key(inputs, dataclasses.replace(base, **{name: value}))
            decides = name not in ("shards", "shard_rows", "stream_rows", "address", "wait") and (
                name not in ("support", "purity", "bandwidth") or strategy == "probcover")
            assert (changed != key) == decides, (strategy, name)


# a valid value other than the default for every training option
OTHER_TRAIN = {"epochs": 3, "batch_size": 8, "lr": 0.5, "weight_decay": 0.25, "margin": 0.125, "warmup_epochs": 1,
               "num_workers": 2, "threads": 2, "use_gpu": False, "seed": 9, "max_failures": 1, "checkpoint_every": 2,
               "init": "previous", "finetune_lr": 0.0625, "model_choice": "average", "average_epochs": 3,
               "batching": "clustered"}
OTHER_MODEL = {"image_dim": 16, "text_dim": 8, "embed_dim": 4, "hidden": 0, "image_block_rank": 2}


def test_every_training_option_reaches_hnal_train_and_the_run_yaml(tmp_path):
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(OTHER_TRAIN) | {"model"}
    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(OTHER_MODEL)
    argv = ["train", "--data", "d", "--features", "f", "--out", "o"]
    for name, value in OTHER_TRAIN.items():
        argv += ["--" + name.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    for name, value in OTHER_MODEL.items():
        argv += ["--model-" + name.replace("_", "-"), str(value)]
    a = build_parser().parse_args(argv)
    want = TrainConfig(**OTHER_TRAIN, model=ModelConfig(**OTHER_MODEL))
    assert TrainConfig(**{n: getattr(a, n) for n in OTHER_TRAIN},
                       model=ModelConfig(**{n: getattr(a, "model_" + n) for n in OTHER_MODEL})) == want
    d = build_parser().parse_args(argv[:7])
    assert TrainConfig(**{n: getattr(d, n) for n in OTHER_TRAIN},
                       model=ModelConfig(**{n: getattr(d, "model_" + n) for n in OTHER_MODEL})) == TrainConfig()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "data": "d", "features": "f", "strategies": [{"name": "r", "strategy": "random"}],
        "train": {**OTHER_TRAIN, "model": OTHER_MODEL}}))
    assert load_loop_config(tmp_path / "run.yaml").train == want
