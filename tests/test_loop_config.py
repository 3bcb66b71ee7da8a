"""Loop configs: every job YAML loads, and a budget-aware strategy switches at its paired-set size."""
from pathlib import Path

import pytest

from hnal_ray.config import ConfigError
from hnal_ray.loop.config import StrategyConfig, load_loop_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "jobs").rglob("*.yaml")))
def test_every_job_config_loads(path):
    cfg = load_loop_config(REPO / path)
    assert cfg.strategies and cfg.seeds and len(set(cfg.seeds)) == len(cfg.seeds)


def test_budget_aware_strategy_switches_at_the_paired_set_size():
    s = StrategyConfig(name="ba", strategy="cluster", within="central", switch_at=600, then={"within": "hardest"})
    assert s.score_config(100, 0, 0, paired_images=599).within == "central"
    assert s.score_config(100, 0, 0, paired_images=600).within == "hardest"
    assert s.score_config(100, 0, 0, paired_images=600).strategy == "cluster"
    with pytest.raises(ConfigError, match="switch_at and then go together"):
        StrategyConfig(name="x", switch_at=3)
    with pytest.raises(ConfigError, match="then may set only"):
        StrategyConfig(name="x", switch_at=3, then={"side": "text"})


@pytest.mark.parametrize("sets, message", [
    (["dataset=mine"], "dataset must be 'emoji' or 'folder'"),
    (["annotator=crowd"], "annotator must be 'oracle' or 'manual'"),
    (["seed_size=some"], "seed_size must be an integer >= 2 or 'all'"),
    (["encoders.image=resnet"], "encoders.image: unknown encoder 'resnet' \\(known: efficientnet-lite0\\)"),
    (["encoders.image_crop=1.5"], "encoders.image_crop must be in \\(0, 1\\]"),
    (["encoders.colour=1"], "encoders.colour: unknown key"),
    (["annotator=manual", "strategies=[{name: t, strategy: random, side: text}]"], "every strategy needs side: image"),
])
def test_data_and_annotation_keys_are_checked(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_loop_config(REPO / "jobs" / "smoke.yaml", sets)


def test_new_keys_at_their_defaults_keep_old_runs_resumable():
    cfg = load_loop_config(REPO / "jobs" / "smoke.yaml")
    assert not {"dataset", "annotator", "encoders"} & cfg.result_fields().keys()
    mine = load_loop_config(REPO / "jobs" / "smoke.yaml", ["dataset=folder", "annotator=manual", "seed_size=all",
                                                           "encoders.image_crop=0.875"])
    assert mine.result_fields()["encoders"]["image_crop"] == 0.875 and mine.seed_size == "all"


@pytest.mark.parametrize("sets, message", [
    (['strategies=[{name: "../../victim", strategy: random}]'], "strategies: name '../../victim' must be one path "
                                                                "segment"),
    (['strategies=[{name: "a/b", strategy: random}]'], "must be one path segment"),
    (['strategies=[{name: "..", strategy: random}]'], "must be one path segment"),
    (['strategies=[{name: "_seed-set", strategy: random}]'], "must be one path segment"),
    (["seeds=[0, 0]"], "seeds must be distinct integers >= 0, got \\[0, 0\\]"),
    (["seeds=[]"], "seeds: at least one seed is needed"),
    (["seeds=[-1]"], "seeds must be distinct integers >= 0"),
    (["rounds=0"], "rounds must be an integer >= 1"),
    (["budget=0"], "budget must be an integer >= 1"),
    (["train.batch_size=0"], "train.batch_size must be an integer >= 2 .*got 0"),
    (["train.epochs=-3"], "train.epochs must be an integer >= 1, got -3"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["train.margin=-0.1"], "train.margin must be >= 0"),
    (["train.warmup_epochs=-1"], "train.warmup_epochs must be an integer >= 0"),
])
def test_names_seeds_and_training_settings_are_checked(sets, message):
    """Issue 23 (3, 6, 8, 10): a name that becomes a path is one safe segment; seeds and training
    settings are checked before anything runs, with one line naming the key."""
    with pytest.raises(ConfigError, match=message):
        load_loop_config(REPO / "jobs" / "smoke.yaml", sets)


def test_then_types_and_huge_values_give_one_short_line(tmp_path):
    """Issue 23 (10): a `then:` of the wrong type is a ConfigError naming it, not a traceback; a YAML
    alias bomb in a typed key gives a short line, not the expanded value."""
    with pytest.raises(ConfigError, match=r"then.k must be an integer, got 'x'"):
        load_loop_config(REPO / "jobs" / "smoke.yaml",
                         ["strategies=[{name: b, strategy: hard-negative, switch_at: 5, then: {k: x}}]"])
    bomb = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdef", "bcdefg")) + "]"   # 9^7 values expanded
    with pytest.raises(ConfigError) as exc:
        load_loop_config(REPO / "jobs" / "smoke.yaml", [f"seeds={bomb}"])
    assert "seeds must be a list of integers" in str(exc.value) and len(str(exc.value)) < 400 and "\n" not in str(exc.value)
