"""The active-learning loop: for each strategy and seed, round by round,
train -> evaluate -> embed -> score and select -> annotate -> add, with resumable round states."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hnal_ray.loop.annotate import Annotator, OracleAnnotator
from hnal_ray.config import ScoreInputs
from hnal_ray.data.splits import split_ids
from hnal_ray.retrieval.embed import embed_features, write_embeddings
from hnal_ray.data.features import FeatureSet, load_features
from hnal_ray.io import embedding_array, write_json, write_parquet
from hnal_ray.loop.config import LoopConfig, StrategyConfig
from hnal_ray.retrieval.training import evaluate, load_best

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Splits:
    train: np.ndarray   # image ids the pool and the seed set come from
    val: np.ndarray
    test: np.ndarray


def prepare(cfg: LoopConfig) -> tuple[FeatureSet, Splits]:
    """Build the data set and extract features if missing (both cached), then read the splits."""
    from hnal_ray.cluster.features import extract_features
    from hnal_ray.data.emoji import build_emoji_dataset, subsample_dataset

    data = Path(cfg.data)
    if not (data / "split.parquet").exists():
        if cfg.data_subset:
            full = data.with_name(data.name + "-full")
            build_emoji_dataset(full)
            subsample_dataset(full, data, cfg.data_subset)
        else:
            build_emoji_dataset(data)
    extract_features(cfg.data, cfg.features)
    return load_features(cfg.features), Splits(*(split_ids(cfg.data, s) for s in ("train", "val", "test")))


class Loop:
    """One run directory: round states under DIR/<strategy>/seed-<s>/round-<r>/state.json."""

    def __init__(self, cfg: LoopConfig, out: str | Path, annotator: Annotator | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.feats, self.splits = prepare(cfg)
        self.test = self.feats.subset(self.splits.test)
        self.annotator = annotator or OracleAnnotator(self.feats.text_ids, self.feats.text_owner)
        self.total = len(cfg.seeds) * (1 + len(cfg.strategies) * cfg.rounds)
        self.done, self.t0, self.fresh = 0, time.perf_counter(), 0
        self.stop_after = int(os.environ.get("HNAL_STOP_AFTER_ROUNDS", 0))  # test switch: die mid-run

    def run(self) -> list[dict]:
        """Every trajectory to its last round; returns one metrics row per (strategy, seed, round)."""
        rows = []
        for seed in self.cfg.seeds:
            first = self._round(None, seed, 0, None)
            for strategy in self.cfg.strategies:
                state = first
                rows.append(self._row(strategy, seed, state))
                for r in range(1, self.cfg.rounds + 1):
                    state = self._round(strategy, seed, r, state)
                    rows.append(self._row(strategy, seed, state))
        return rows

    # ------------------------------------------------------------------ one round

    def _round(self, strategy: StrategyConfig | None, seed: int, r: int, prev: dict | None) -> dict:
        d = self._dir(strategy, seed, r)
        if (d / "state.json").exists():
            self.done += 1
            return json.loads((d / "state.json").read_text())
        name = strategy.name if strategy else "seed-set"
        t = time.perf_counter()
        if prev is None:
            rng = np.random.default_rng(seed)
            images = np.sort(rng.choice(self.splits.train, self.cfg.seed_size, replace=False))
            paired, selected = self.feats.texts_of(images), np.zeros(0, np.int64)
        else:
            self._stage(name, seed, r, "embed + score + select")
            selected = self._select(strategy, seed, r, prev, d)
            self._stage(name, seed, r, "annotate")
            paired = np.union1d(prev["paired_text_ids"], self.annotator.annotate(strategy.side, selected))
        self._stage(name, seed, r, "train")
        checkpoint, val_best = self._train(paired, seed, d, f"{name}-s{seed}-r{r}")
        model, _ = load_best(checkpoint)
        metrics = evaluate(model, self.test, torch.device("cpu"))
        state = {"strategy": name, "seed": seed, "round": r, "paired_text_ids": paired.tolist(),
                 "paired_images": int(len(np.unique(self.feats.pairs(paired).image_ids))),
                 "selected": selected.tolist(),
                 "annotated": (prev["annotated"] if prev else 0) + len(selected),
                 "checkpoint": checkpoint, "val_best": val_best, "test": metrics,
                 "seconds": time.perf_counter() - t}
        write_json(state, d / "state.json")  # atomic: the round counts as done only now
        self.done, self.fresh = self.done + 1, self.fresh + 1
        if self.fresh == self.stop_after:
            log.warning("HNAL_STOP_AFTER_ROUNDS=%d: stopping the process now", self.stop_after)
            os._exit(3)
        eta = (time.perf_counter() - self.t0) / self.fresh * (self.total - self.done)
        log.info("[%d/%d rounds] %s seed %d round %d: test rsum %.1f, R@1-sum %.1f (%.0fs; ETA %.0f min)",
                 self.done, self.total, name, seed, r, metrics["rsum"], metrics["r1_sum"], state["seconds"],
                 eta / 60)
        return state

    def _select(self, strategy: StrategyConfig, seed: int, r: int, prev: dict, d: Path) -> np.ndarray:
        """Embed paired set and pool with the previous round's model, then `hnal score` on them."""
        paired = np.asarray(prev["paired_text_ids"], np.int64)
        img, txt = embed_features(prev["checkpoint"], self.feats)
        paired_images = np.unique(self.feats.text_owner[np.isin(self.feats.text_ids, paired)])
        emb = d / "embeddings"
        write_embeddings(self.feats, img, txt, emb / "paired", paired_images, np.zeros(0, np.int64))
        self._write_texts(txt, paired, emb / "paired" / "captions.parquet")  # exactly the paired pairs
        if strategy.side == "image":
            pool = np.setdiff1d(self.splits.train, paired_images)
            write_embeddings(self.feats, img, txt, emb / "pool", pool, np.zeros(0, np.int64))
            pool_path = emb / "pool" / "images.parquet"
        else:
            train_texts = self.feats.texts_of(self.splits.train)
            self._write_texts(txt, np.setdiff1d(train_texts, paired), emb / "pool" / "captions.parquet",
                              with_owner=False)
            pool_path = emb / "pool" / "captions.parquet"
        inputs = ScoreInputs(str(emb / "paired" / "images.parquet"), str(emb / "paired" / "captions.parquet"),
                             str(pool_path))
        score_cfg = strategy.score_config(self.cfg.budget, seed * 1000 + r, self.cfg.shards)
        if score_cfg.shards > 0:
            from hnal_ray.cluster.score import run_score_on_ray

            run_score_on_ray(inputs, score_cfg, d / "score")
        else:
            from hnal_ray.score.job import run_score

            run_score(inputs, score_cfg, d / "score")
        sel = pq.read_table(d / "score" / "selection.parquet")
        return sel.column(0).to_numpy().astype(np.int64)

    def _write_texts(self, txt: np.ndarray, text_ids: np.ndarray, path: Path, with_owner: bool = True) -> None:
        keep = np.isin(self.feats.text_ids, text_ids)
        cols = {"text_id": self.feats.text_ids[keep]}
        if with_owner:
            cols["image_id"] = self.feats.text_owner[keep]
        cols["embedding"] = embedding_array(txt[keep])
        write_parquet(pa.table(cols), path)

    def _train(self, paired: np.ndarray, seed: int, d: Path, name: str) -> tuple[str, dict]:
        """Ray Train fit from scratch (a half-finished fit of an interrupted run is discarded,
        so resumed runs give the same numbers); the best checkpoint is copied into the round."""
        from hnal_ray.cluster.train import fit

        storage = self.out / "_train"
        shutil.rmtree(storage / name, ignore_errors=True)
        cfg = dataclasses.replace(self.cfg.train, seed=seed)
        res = fit(self.cfg.features, paired, self.splits.val, cfg, str(storage), name)
        ckpt = d / "checkpoint"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(res.checkpoint, ckpt)
        shutil.rmtree(storage / name, ignore_errors=True)
        return str(ckpt), res.best

    def _dir(self, strategy: StrategyConfig | None, seed: int, r: int) -> Path:
        return self.out / (strategy.name if strategy else "_seed-set") / f"seed-{seed}" / f"round-{r}"

    def _stage(self, name: str, seed: int, r: int, stage: str) -> None:
        log.info("%s seed %d round %d/%d: %s", name, seed, r, self.cfg.rounds, stage)

    @staticmethod
    def _row(strategy: StrategyConfig, seed: int, state: dict) -> dict:
        return {"strategy": strategy.name, "side": strategy.side, "seed": seed, "round": state["round"],
                "annotated": state["annotated"], "paired_texts": len(state["paired_text_ids"]),
                "paired_images": state["paired_images"], **state["test"]}


def run_loop(cfg: LoopConfig, out: str | Path) -> Path:
    """`hnal loop`: every trajectory, then the report; re-running resumes from finished rounds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if saved.exists() and json.loads(saved.read_text()) != current:
        from hnal_ray.config import ConfigError

        raise ConfigError(f"{out}: holds a run with a different config ({saved}); use another --out")
    write_json(current, saved)
    from hnal_ray.loop.report import write_report

    rows = Loop(cfg, out).run()
    return write_report(cfg, out, rows)
