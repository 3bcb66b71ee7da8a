"""The statistics of loop runs: means over seeds, paired differences with Student-t intervals,
annotations to reach a baseline, selection diagnostics and stage times. Used by the report and by
`hnal bench compare`/`table`/`choose`; nothing here renders."""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

from hnal_ray.loop.config import StrategyConfig

# the scalar selection diagnostics of a round (loop/diagnostics.py), in the report's column order
DIAGNOSTICS = ("redundancy", "redundancy_random", "anchors_beaten_per_item", "anchors_covered", "clusters_hit",
               "clusters_hit_random", "cluster_max_share", "near_duplicates", "groups_hit", "groups_hit_random")
# the stages of a round, in order: the keys of state["timings"] and of timings.parquet
STAGES = ("embed_s", "score_s", "select_s", "diagnostics_s", "annotate_s", "train_s", "evaluate_s")
TIME_COLUMNS = STAGES + ("round_s",)


def t95_half_width(d: np.ndarray) -> float:
    """Half the width of the two-sided 95% Student-t interval of the mean of `d` (NaN for one value)."""
    if len(d) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))


def paired_differences(rows: list[dict], baseline: str = "random", metric: str = "r1_sum",
                       first_round: int = 1) -> list[dict]:
    """Per (strategy, round >= first_round): the mean over seeds of (strategy - baseline) and its
    paired 95% confidence interval (t over the seeds both ran; every strategy of a seed starts from
    the same seed set, so the pairing removes the seed set's luck)."""
    base = {(r["seed"], r["round"]): r[metric] for r in rows if r["strategy"] == baseline}
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != baseline):
        for rnd in sorted({r["round"] for r in rows if r["strategy"] == strategy and r["round"] >= first_round}):
            d = np.array([r[metric] - base[(r["seed"], rnd)] for r in rows if r["strategy"] == strategy
                          and r["round"] == rnd and (r["seed"], rnd) in base])
            if len(d) == 0:
                continue
            half = t95_half_width(d)
            out.append({"strategy": strategy, "round": rnd, "seeds": len(d), "diff": float(d.mean()),
                        "ci_low": float(d.mean() - half), "ci_high": float(d.mean() + half)})
    return out


def compare_runs(a: list[dict], b: list[dict], metric: str = "r1_sum") -> list[dict]:
    """Run B minus run A (rows of two runs' metrics.parquet), per strategy both ran and per round
    (0 included: the seed model), paired by seed, with the 95% confidence interval: e.g. the same
    strategies and seeds with another training config."""
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in a):
        rows = ([r | {"strategy": "a"} for r in a if r["strategy"] == strategy]
                + [r | {"strategy": "b"} for r in b if r["strategy"] == strategy])
        out += [d | {"strategy": strategy} for d in paired_differences(rows, "a", metric, first_round=0)]
    return out


def control_pairs(strategies: list[StrategyConfig]) -> list[tuple[str, str]]:
    """(hardest, control) for each clustered strategy that takes the hardest item of a cluster and
    has, in the same run, a control that differs only in taking a random item (same clusters,
    quotas, weight and k): hardness is credited only if it beats that control."""
    def key(s: StrategyConfig) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in dataclasses.asdict(s).items() if k not in ("name", "within")))
    controls = {key(s): s.name for s in strategies if s.strategy == "cluster" and s.within == "random"}
    return [(s.name, controls[key(s)]) for s in strategies
            if s.strategy == "cluster" and s.within == "hardest" and s.switch_at is None and key(s) in controls]


def control_differences(rows: list[dict], pairs: list[tuple[str, str]], metric: str = "r1_sum") -> list[dict]:
    """Per (hardest, control) pair and round >= 1: hardest minus control, paired by seed, 95% CI."""
    out = []
    for hardest, control in pairs:
        sub = ([r | {"strategy": "h"} for r in rows if r["strategy"] == hardest]
               + [r | {"strategy": "c"} for r in rows if r["strategy"] == control])
        out += [d | {"strategy": hardest, "control": control} for d in paired_differences(sub, "c", metric)]
    return out


def diagnostics_summary(states: list[dict]) -> list[dict]:
    """Mean of each scalar selection diagnostic per strategy over seeds and rounds >= 1."""
    out = []
    for strategy in dict.fromkeys(s["strategy"] for s in states):
        diags = [s["diagnostics"] for s in states if s["strategy"] == strategy and s.get("diagnostics")]
        if diags:
            out.append({"strategy": strategy, "rounds": len(diags), **{
                k: float(np.mean([d[k] for d in diags])) for k in DIAGNOSTICS if all(k in d for d in diags)}})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (strategy, round)."""
    out = []
    for strategy, rnd in sorted({(r["strategy"], r["round"]) for r in rows}):
        group = [r for r in rows if r["strategy"] == strategy and r["round"] == rnd]
        row = {"strategy": strategy, "round": rnd, "seeds": len(group),
               "annotated": float(np.mean([g["annotated"] for g in group]))}
        for m in ("r1_sum", "rsum", "i2t_R@1", "t2i_R@1"):
            vals = np.array([g[m] for g in group])
            row[m], row[f"{m}_std"] = float(vals.mean()), float(vals.std())
        out.append(row)
    return out


def annotations_to_reach(summary: list[dict], baseline: str = "random", metric: str = "r1_sum") -> list[dict]:
    """Per strategy: the annotations of the first measured round whose mean `metric` (over seeds)
    reaches the baseline's mean at its last round, or None; `fraction` of the baseline's
    annotations at that last round. Measured rounds only, no interpolation."""
    base = [r for r in summary if r["strategy"] == baseline]
    if not base:
        return []
    last = max(base, key=lambda r: r["round"])
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in summary):
        hit = [r for r in sorted((r for r in summary if r["strategy"] == strategy), key=lambda r: r["round"])
               if r[metric] >= last[metric]]
        at = hit[0]["annotated"] if hit else None
        out.append({"strategy": strategy, "target": last[metric], "baseline_annotated": last["annotated"],
                    "annotated": at, "fraction": None if at is None or not last["annotated"] else at / last["annotated"]})
    return out


def stage_times(rows: list[dict]) -> list[dict]:
    """Mean wall seconds per round of each stage: the seed-set rounds, then each strategy's rounds >= 1."""
    groups = {"seed set (round 0)": [r for r in rows if r["round"] == 0 and r["strategy"] == rows[0]["strategy"]]}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        groups[strategy] = [r for r in rows if r["strategy"] == strategy and r["round"] > 0]
    return [{"rounds": name, "n": len(g), **{k: float(np.mean([r.get(k, 0.0) for r in g])) for k in TIME_COLUMNS}}
            for name, g in groups.items() if g]
