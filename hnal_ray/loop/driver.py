"""The active-learning loop's driver: checks or builds the data and features, then schedules the
rounds (`rounds.run_round`): round 0 (the seed set) per seed, then per (strategy, seed) trajectory,
round by round, and writes the report.

After round 0 every trajectory depends only on its own previous round, so independent rounds run
at once as Ray tasks (`concurrency`); each round writes its `state.json` atomically when done, so a
killed run resumes from its finished rounds, and the numbers never depend on how many ran at once
(each round sets its own torch thread count and seeds). A round that waits for people's captions
(`annotator: manual`) stops its trajectory; the others go on.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from hnal_ray.config import ConfigError
from hnal_ray.io import read_json, write_json
from hnal_ray.loop.config import LoopConfig
from hnal_ray.loop.report import write_report
from hnal_ray.loop.stats import STAGES
from hnal_ray.loop.rounds import read_state, run_round
from hnal_ray.score.outdir import out_lock
from hnal_ray.score.plan import file_digest

log = logging.getLogger(__name__)


class AnnotationPending(Exception):
    """The loop stopped after selection: these rounds wait for captions (`hnal annotations import`)."""

    def __init__(self, out: Path, rounds: list[dict]):
        self.out, self.rounds = out, rounds
        n = sum(r["selected"] for r in rounds)
        super().__init__(f"{len(rounds)} round(s) wait for captions of {n} selected images")


def prepare(cfg: LoopConfig) -> None:
    """Check or build the data folder and extract features if missing (cached); runs on the driver.
    A folder the emoji builder did not write is never written (dataset: folder only checks it)."""
    from hnal_ray.cluster.features import extract_features
    from hnal_ray.data.contract import check_data_dir, is_precomputed

    data = Path(cfg.data)
    if cfg.dataset == "emoji":
        from hnal_ray.data.emoji import build_emoji_dataset, subsample_dataset

        full = data.with_name(data.name + "-full") if cfg.data_subset else data
        build_emoji_dataset(full, split=cfg.data_split, style=cfg.data_style)
        if cfg.data_subset:
            subsample_dataset(full, data, cfg.data_subset)
    check_data_dir(data)
    if cfg.annotator == "manual" and is_precomputed(data):
        raise ConfigError(f"annotator: manual encodes new captions with encoders.text, but {data} holds "
                          f"precomputed embeddings from another encoder")
    extract_features(cfg.data, cfg.features, encoders=cfg.encoders)
    if cfg.train.model.image_block_rank > 0:  # the trainable last stage's inputs (cached)
        from hnal_ray.data.image_maps import extract_image_maps

        extract_image_maps(cfg.data, cfg.features, cfg.encoders)


# ---------------------------------------------------------------------------------- scheduling

class Progress:
    """One bar (rounds done / total, ETA) on a terminal; one log line per finished round otherwise."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.fresh, self.t0 = total, done, 0, time.perf_counter()
        self.bar = tqdm(total=total, initial=done, unit="round", desc="rounds") if sys.stderr.isatty() else None

    def finished(self, state: dict) -> None:
        self.done, self.fresh = self.done + 1, self.fresh + 1
        eta = (time.perf_counter() - self.t0) / self.fresh * (self.total - self.done)
        stages = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in state["timings"].items())
        m = state["test"]
        line = (f"[{self.done}/{self.total} rounds] {state['strategy']} seed {state['seed']} round {state['round']}: "
                f"test rsum {m['rsum']:.1f}, R@1-sum {m['r1_sum']:.1f} ({state['seconds']:.0f}s: {stages}; "
                f"ETA {eta / 60:.1f} min)")
        if self.bar is not None:
            self.bar.set_postfix_str(f"{state['strategy']} s{state['seed']} r{state['round']}", refresh=False)
            self.bar.update(1)
        else:
            log.info("%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_rounds(cfg: LoopConfig, out: Path) -> dict[tuple, dict]:
    """Every round of every trajectory, independent ones at once; {(strategy|None, seed, round): state}."""
    from hnal_ray.cluster.tasks import TaskPool, task_resources

    if cfg.concurrency == 0:
        pool = TaskPool(0)
    else:
        cpus, gpus, fits = task_resources(cfg.train.threads)
        if cfg.train.num_workers not in ("auto", 0):
            cpus = 0.0  # the round only drives the fit; its DDP workers hold the CPUs
        pool = TaskPool(fits if cfg.concurrency == "auto" else cfg.concurrency, cpus, gpus)
    total = len(cfg.seeds) * (1 + len(cfg.strategies) * cfg.rounds)
    done = sum(1 for f in out.glob("*/seed-*/round-*/state.json") if read_json(f) is not None)  # damaged: redone
    progress, states = Progress(total, min(done, total)), {}
    log.info("%d rounds (%d already done), up to %s at once", total, min(done, total),
             pool.max_in_flight or "1 (in the driver)")
    ready = [(None, seed, 0, None) for seed in cfg.seeds]
    by_name = {s.name: s for s in cfg.strategies}
    try:
        while ready or pool.busy:
            while ready:
                name, seed, r, prev = ready.pop(0)
                state = read_state(out, name, seed, r)
                if state is None:
                    pool.submit((name, seed, r), run_round, cfg, str(out), by_name.get(name), seed, r, prev)
                else:
                    ready += _after(cfg, states, (name, seed, r), state)
            if pool.busy:
                for key, state in pool.wait():
                    if "pending" in state:  # stopped for annotation: its trajectory waits
                        states[key] = state
                        continue
                    progress.finished(state)
                    ready += _after(cfg, states, key, state)
    except BaseException:
        pool.cancel()
        raise
    finally:
        progress.close()
    return states


def _after(cfg: LoopConfig, states: dict, key: tuple, state: dict) -> list[tuple]:
    """Record a finished round; the rounds it unblocks."""
    states[key] = state
    name, seed, r = key
    if r >= cfg.rounds:
        return []
    if name is None:
        return [(s.name, seed, 1, state) for s in cfg.strategies]
    return [(name, seed, r + 1, state)]


def metric_rows(cfg: LoopConfig, states: dict) -> list[dict]:
    """One row per (strategy, seed, round), in config order, with a fixed column order: the numbers
    of the run, which never depend on how or how fast it ran."""
    return [{"strategy": strategy.name, "side": strategy.side, "seed": seed, "round": r,
             "annotated": s["annotated"], "paired_texts": len(s["paired_text_ids"]),
             "paired_images": s["paired_images"], **{k: s["test"][k] for k in sorted(s["test"])}}
            for strategy, seed, r, s in _each_round(cfg, states)]


def timing_rows(cfg: LoopConfig, states: dict) -> list[dict]:
    """Wall seconds of each stage of each round (round 0 is listed under every strategy)."""
    return [{"strategy": strategy.name, "seed": seed, "round": r,
             **{k: float(s.get("timings", {}).get(k, 0.0)) for k in STAGES}, "round_s": float(s["seconds"])}
            for strategy, seed, r, s in _each_round(cfg, states)]


def _each_round(cfg: LoopConfig, states: dict):
    for strategy in cfg.strategies:
        for seed in cfg.seeds:
            for r in range(cfg.rounds + 1):
                yield strategy, seed, r, states[(strategy.name if r else None, seed, r)]


def run_loop(cfg: LoopConfig, out: str | Path) -> Path:
    """`hnal loop`: every trajectory, then the report; re-running resumes from finished rounds. One
    loop at a time writes an --out (the score job's lock)."""
    out = Path(out)
    with out_lock(out):
        return _run_loop_locked(cfg, out)


def data_fingerprint(cfg: LoopConfig) -> dict[str, str]:
    """{file: BLAKE2b} of every file under the data and feature folders (by content, as `hnal
    score`'s run key): a resumed loop must see the data its finished rounds were computed on."""
    out = {}
    for role, root in (("data", cfg.data), ("features", cfg.features)):
        base = Path(root)
        for f in sorted(base.rglob("*")) if base.is_dir() else []:
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(base).parts):
                st = f.stat()
                out[f"{role}/{f.relative_to(base)}"] = file_digest(str(f.resolve()), st.st_size, st.st_mtime_ns,
                                                                   st.st_ctime_ns, st.st_ino)
    return out


def _check_data_unchanged(cfg: LoopConfig, out: Path) -> None:
    saved, current = out / "inputs.json", data_fingerprint(cfg)
    before = json.loads(saved.read_text() or "{}") if saved.exists() else current
    if before != current:
        changed = sorted(set(before) ^ set(current) | {f for f in before if f in current and before[f] != current[f]})
        raise ConfigError(f"{out}: the data changed since this run's finished rounds were computed "
                          f"({len(changed)} files, e.g. {changed[0]}); their numbers would mix with the new "
                          f"data's: use another --out, or restore the data")
    write_json(current, saved)


def _check_budget(cfg: LoopConfig) -> None:
    """A budget no round could spend is refused before round 0 trains: the pool is drawn from the
    train split, so every round's picks fit in it at most."""
    from hnal_ray.data.splits import split_ids

    train = len(split_ids(cfg.data, "train"))
    seed = 0 if cfg.seed_size == "all" else cfg.seed_size
    if cfg.budget > train - seed:
        raise ConfigError(f"budget {cfg.budget} is larger than the pool can be: {cfg.data} has {train} train "
                          f"images{f', {seed} of them the seed set' if seed else ''}")


def _run_loop_locked(cfg: LoopConfig, out: Path) -> Path:
    saved = out / "config.json"
    current = json.loads(json.dumps(cfg.result_fields()))
    before = read_json(saved) if saved.exists() else None
    if before is not None and before != current:
        extended = ({**before, "rounds": None} == {**current, "rounds": None}
                    and isinstance(before.get("rounds"), int) and current["rounds"] > before["rounds"])
        if not extended:
            raise ConfigError(f"{out}: holds a run with a different config ({saved}); use another --out "
                              f"(only `rounds` may grow, to extend a run)")
        log.info("%s: extending the run from %d to %d rounds; its finished rounds are kept", out, before["rounds"],
                 current["rounds"])
    write_json(current, saved)
    t = time.perf_counter()
    prepare(cfg)
    _check_data_unchanged(cfg, out)
    _check_budget(cfg)
    prepare_s = time.perf_counter() - t
    t = time.perf_counter()
    states = run_rounds(cfg, out)
    pending = [s for s in states.values() if "pending" in s]
    if pending:
        write_json({"rounds": pending}, out / "pending_annotation.json")
        raise AnnotationPending(out, pending)
    (out / "pending_annotation.json").unlink(missing_ok=True)
    write_json({"prepare_s": prepare_s, "rounds_s": time.perf_counter() - t}, out / "wall_time.json")
    return write_report(cfg, out, metric_rows(cfg, states), timing_rows(cfg, states),
                        [states[k] for k in sorted(states, key=str) if k[2] > 0])
