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
