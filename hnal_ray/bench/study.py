"""Selection-study tables from loop runs: runs of one config over disjoint seed ranges pooled into
one table (`hnal bench table`), and the v2 protocol's choice rule applied to them (`hnal bench
choose`; docs/selection.md, "Selection v2: the protocol"), so no table is combined by hand."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from hnal_ray.io import InputError
from hnal_ray.loop.stats import annotations_to_reach, paired_differences, summarize

# the protocol's order of simplicity, for ties within TIE of the best mean
SIMPLER = ("maxherding", "typiclust", "probcover", "central-v1", "tcm")
TIE = 0.1


def pooled_rows(runs: list[str | Path]) -> tuple[list[dict], dict]:
    """The metrics rows of loop runs that differ only in their seeds (disjoint), pooled, and the
    shared config (seeds: all of them). Refused, naming the key, when the configs differ otherwise."""
    rows, config, seen = [], None, {}
    for run in map(Path, runs):
        try:
            cfg = json.loads((run / "config.json").read_text())
            part = pq.read_table(run / "metrics.parquet").to_pylist()
        except (OSError, ValueError) as exc:
            raise InputError(f"{run}: not a finished loop run ({exc})") from None
        seeds = cfg.pop("seeds")
        if config is None:
            config = cfg
        else:
            diff = sorted(k for k in set(cfg) | set(config) if cfg.get(k) != config.get(k))
            if diff:
                raise InputError(f"{run}: its config differs from {runs[0]} in {', '.join(diff)}; only runs that "
                                 f"differ in their seeds are pooled")
        for s in seeds:
            if s in seen:
                raise InputError(f"{run}: seed {s} is also in {seen[s]}; pooled runs need disjoint seeds")
            seen[s] = run
        rows += part
    return rows, config | {"seeds": sorted(seen)}


def study_table(rows: list[dict], baseline: str = "random", metric: str = "r1_sum") -> str:
    """Markdown: per strategy and round, mean ± std over seeds and the paired difference to the
    baseline with its 95% interval; then the annotations each needs to reach the baseline's last round."""
    summary = summarize(rows)
    cells = {(s["strategy"], s["round"]): f"{s[metric]:.1f} ± {s[metric + '_std']:.1f}"
             for s in summary}
    for d in paired_differences(rows, baseline, metric):  # rounds >= 1, each with its summary cell
        cells[d["strategy"], d["round"]] += (f" ({d['diff']:+.1f} "
                                             f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}])")
    rounds = sorted({r["round"] for r in summary if r["round"] >= 1})
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"{metric}, {len(seeds)} seeds ({_ranges(seeds)}); cells: mean ± std (minus {baseline}, paired 95% CI)", "",
             "| strategy | " + " | ".join(f"round {r}" for r in rounds) + " |", "|---" * (len(rounds) + 1) + "|"]
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        row = [cells.get((strategy, rnd), "") for rnd in rounds]
        lines.append(f"| {strategy} | " + " | ".join(row) + " |")
    reach = annotations_to_reach(summary, baseline, metric)
    if reach:
        lines += ["", f"annotations to reach {baseline}'s last-round mean ({reach[0]['target']:.1f}, "
                      f"{reach[0]['baseline_annotated']:.0f} annotations):"]
        lines += [f"- {r['strategy']}: " + ("not reached" if r["annotated"] is None else
                                            f"{r['annotated']:.0f} ({r['fraction']:.2f} of {baseline}'s)")
                  for r in reach]
    return "\n".join(lines)


def choose(regimes: dict[str, list[dict]], baseline: str = "random", metric: str = "r1_sum") -> dict:
    """The protocol's stage A rule over the regimes' rows: a candidate is eligible when no (regime,
    round) interval lies below 0; the winner is the eligible one with the largest mean of its cell
    means (ties within TIE to the simpler, SIMPLER's order); no winner (recommended = random) when
    none is eligible or the winner's mean is <= 0."""
    cells: dict[str, list[dict]] = {}
    for regime, rows in regimes.items():
        for d in paired_differences(rows, baseline, metric):
            cells.setdefault(d["strategy"], []).append(d | {"regime": regime})
    n_cells = max((len(v) for v in cells.values()), default=0)
    table = [{"strategy": name, "cells": len(ds), "mean": float(np.mean([d["diff"] for d in ds])),
              "below": [f"{d['regime']} round {d['round']}" for d in ds if d["ci_high"] < 0],
              "above": [f"{d['regime']} round {d['round']}" for d in ds if d["ci_low"] > 0]}
             for name, ds in cells.items()]
    eligible = [t for t in table if not t["below"] and t["cells"] == n_cells]
    winner = None
    if eligible:
        best = max(t["mean"] for t in eligible)
        close = [t for t in eligible if t["mean"] >= best - TIE]
        rank = {name: i for i, name in enumerate(SIMPLER)}
        winner = min(close, key=lambda t: (rank.get(t["strategy"], len(SIMPLER)), -t["mean"]))
        if winner["mean"] <= 0:
            winner = None
    return {"candidates": sorted(table, key=lambda t: -t["mean"]), "winner": winner["strategy"] if winner else None,
            "cells": n_cells}


def format_choice(res: dict) -> str:
    lines = ["| candidate | mean of cell means | cells below 0 | cells above 0 |", "|---|---|---|---|"]
    for t in res["candidates"]:
        lines.append(f"| {t['strategy']} | {t['mean']:+.2f} | {', '.join(t['below']) or '-'} | "
                     f"{', '.join(t['above']) or '-'} |")
    lines += ["", f"winner: {res['winner']}" if res["winner"]
              else "winner: none (recommended = random)"]
    return "\n".join(lines)


def _ranges(seeds: list[int]) -> str:
    """Sorted distinct seeds as runs of consecutive ones: "0-4, 7, 9-10"."""
    runs = [[s for _, s in g]
            for _, g in itertools.groupby(enumerate(seeds), lambda x: x[1] - x[0])]
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
