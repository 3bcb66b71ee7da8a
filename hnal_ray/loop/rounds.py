"""One round of the active-learning loop, in whatever process it lands in (a Ray task or the driver):
round 0 trains the seed-set model of a seed; round r >= 1 of a (strategy, seed) trajectory embeds
with round r-1's model -> scores and selects -> annotates (oracle, or people: `manual.py`) ->
trains -> evaluates, and writes its `state.json` atomically when done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hnal_ray.config import ConfigError, ScoreInputs
from hnal_ray.cluster.dispatch import run_score_job
from hnal_ray.data.features import FeatureSet, load_features
from hnal_ray.data.splits import split_ids
from hnal_ray.device import pick_device
from hnal_ray.io import embedding_array, read_embeddings, read_json, write_json, write_parquet
from hnal_ray.loop.annotate import OracleAnnotator
from hnal_ray.loop.config import LoopConfig, StrategyConfig
from hnal_ray.loop.diagnostics import selection_diagnostics
from hnal_ray.retrieval.embed import embed_features, write_embeddings
from hnal_ray.retrieval.training import evaluate, load_best

log = logging.getLogger(__name__)
DIAGNOSTIC_CLUSTERS = 20


@dataclasses.dataclass(frozen=True)
class Splits:
    train: np.ndarray   # image ids the pool and the seed set come from
    val: np.ndarray
    test: np.ndarray


@dataclasses.dataclass(frozen=True)
class Context:
    """What every round reads: the frozen features, the splits, the test set and the annotator,
    and for the diagnostics each image's frozen-feature cluster and data-set group (or None)."""

    feats: FeatureSet
    splits: Splits
    test: FeatureSet
    annotator: OracleAnnotator
    image_cluster: np.ndarray
    image_group: np.ndarray | None
    captioned_train: np.ndarray  # train images with captions: the seed set's source, the oracle's pool

    def with_annotations(self, extra_texts: tuple[str, ...]) -> "Context":
        """This context with the captions people wrote during a trajectory added to its features."""
        feats = self.feats
        for path in extra_texts:
            more = read_embeddings(path, "text_id", "image_id")
            feats = feats.with_texts(more.ids, more.owner, more.emb)
        return dataclasses.replace(self, feats=feats) if extra_texts else self


@functools.lru_cache(maxsize=2)
def load_context(features: str, data: str, image_maps: bool = False) -> Context:
    """Loaded once per process (Ray reuses a task's worker process for the next round); `image_maps`
    for a model that trains the image encoder's last stage."""
    feats = load_features(features, image_maps=image_maps)
    splits = Splits(*(split_ids(data, s) for s in ("train", "val", "test")))
    group = None
    if "group" in pq.read_schema(Path(data) / "images.parquet").names:
        t = pq.read_table(Path(data) / "images.parquet", columns=["image_id", "group"])
        by_id = dict(zip(t["image_id"].to_pylist(), t["group"].to_pylist()))
        group = np.array([str(by_id.get(int(i), "")) for i in feats.image_ids])
    return Context(feats, splits, feats.subset(splits.test), OracleAnnotator(feats.text_ids, feats.text_owner),
                   frozen_clusters(feats.image_feat, DIAGNOSTIC_CLUSTERS), group,
                   np.intersect1d(splits.train, feats.text_owner))


def frozen_clusters(feat: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(n,) k-means cluster of each frozen feature row (unit-normalised; the project's one k-means,
    seeded): diagnostics only."""
    from hnal_ray.score.kmeans import cluster_labels

    x = np.asarray(feat, np.float64)
    x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return cluster_labels(x, k, seed)[1]


def round_dir(out: Path, strategy: str | None, seed: int, r: int) -> Path:
    return Path(out) / (strategy or "_seed-set") / f"seed-{seed}" / f"round-{r}"


def read_state(out: Path, strategy: str | None, seed: int, r: int) -> dict | None:
    return read_json(round_dir(out, strategy, seed, r) / "state.json")


# ---------------------------------------------------------------------------------- one round

def run_round(cfg: LoopConfig, out: str, strategy: StrategyConfig | None, seed: int, r: int,
              prev: dict | None) -> dict:
    """One round, in whatever process it lands in (a Ray task or the driver); returns its state."""
    rnd = Round.start(cfg, Path(out), strategy, seed, r, prev)
    if prev is None:
        rnd.draw_seed_set()
    else:
        rnd.select()
        if not rnd.annotate():  # people caption the picks: the round waits for them
            return rnd.pending()
    rnd.train()
    rnd.evaluate()
    return rnd.finish()


@dataclasses.dataclass
class Round:
    """The state of one round as its stages fill it in; each stage records its wall time."""

    cfg: LoopConfig
    out: Path
    strategy: StrategyConfig | None
    seed: int
    r: int
    prev: dict | None
    ctx: Context
    device: torch.device
    t0: float
    extra: tuple[str, ...] = ()           # feature files of captions people wrote in this trajectory
    timings: dict = dataclasses.field(default_factory=dict)
    selected: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    diagnostics: dict | None = None
    paired: np.ndarray | None = None      # paired text ids after this round's annotations
    seed_images: np.ndarray | None = None
    checkpoint: str = ""
    val_best: dict | None = None
    reference: str | None = None
    metrics: dict | None = None

    @classmethod
    def start(cls, cfg, out, strategy, seed, r, prev) -> "Round":
        t0 = time.perf_counter()
        torch.set_num_threads(cfg.train.threads)
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # local mode logs every report at INFO
        extra = tuple(prev.get("extra_texts", ())) if prev else ()
        ctx = load_context(cfg.features, cfg.data, cfg.train.model.image_block_rank > 0).with_annotations(extra)
        # the one device choice of the round: a task granted a GPU sees it, others see none
        return cls(cfg, out, strategy, seed, r, prev, ctx, pick_device("auto"), t0, extra)

    @property
    def name(self) -> str:
        return self.strategy.name if self.strategy else "seed-set"

    @property
    def dir(self) -> Path:
        return round_dir(self.out, self.strategy.name if self.strategy else None, self.seed, self.r)

    @contextlib.contextmanager
    def timed(self, key: str):
        t = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t

    def draw_seed_set(self) -> None:
        """Round 0: the seed's seed set (every captioned train image with seed_size: all)."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.seed_size == "all":
            images = ctx.captioned_train
        else:
            if cfg.seed_size > len(ctx.captioned_train):
                raise ConfigError(f"seed_size {cfg.seed_size} is larger than the {len(ctx.captioned_train)} "
                                  f"captioned train images of {cfg.data}")
            images = np.sort(np.random.default_rng(self.seed).choice(ctx.captioned_train, cfg.seed_size,
                                                                      replace=False))
        self.seed_images, self.paired = images, ctx.feats.texts_of(images)

    def select(self) -> None:
        """Embed with the previous round's model, score and select, then the diagnostics; a manual
        round selected in an earlier run keeps its selection (never reselected)."""
        pending = self.dir / "pending.json"
        if self.cfg.annotator == "manual" and pending.exists():
            saved = json.loads(pending.read_text())
            self.selected, self.diagnostics = np.asarray(saved["selected"], np.int64), saved["diagnostics"]
            self.timings = saved["timings"]
            return
        self.selected, emb = _select(self.cfg, self.ctx, self.strategy, self.seed, self.r, self.prev, self.dir,
                                     self.timings, self.device)
        with self.timed("diagnostics_s"):
            self.diagnostics = _diagnostics(self.ctx, self.strategy, self.selected, self.prev, emb,
                                            self.seed * 1000 + self.r)

    def annotate(self) -> bool:
        """The picks' captions: revealed by the oracle, or imported from people (False: not yet)."""
        with self.timed("annotate_s"):  # a round left waiting is dropped, its timings with it
            if self.cfg.annotator == "manual":
                added = _captions_from_people(self.cfg, self.dir, self.name, self.seed, self.r,
                                              self.selected, self.diagnostics, self.timings, self.device)
                if added is None:
                    return False
                new_texts, self.selected, features = added
                self.extra += (features,)
                self.ctx = self.ctx.with_annotations((features,))
            else:
                new_texts = self.ctx.annotator.annotate(self.strategy.side, self.selected)
            self.paired = np.union1d(self.prev["paired_text_ids"], new_texts)
        return True

    def pending(self) -> dict:
        return {"pending": str(self.dir), "strategy": self.name, "seed": self.seed, "round": self.r,
                "selected": len(self.selected)}

    def train(self) -> None:
        """The dual encoder on the paired set (from scratch or the last round's weights); in round 0,
        the reference model of reducible hardness too (once per seed, on the validation pairs, held
        out from selection, validated on the seed set)."""
        cfg, ctx, prev = self.cfg, self.ctx, self.prev
        with self.timed("train_s"):
            init = prev["checkpoint"] if prev is not None and cfg.train.init == "previous" else None
            self.checkpoint, self.val_best = _train(cfg, ctx, self.paired, self.seed, self.dir, self.out,
                                                    f"{self.name}-s{self.seed}-r{self.r}", init, self.extra)
            self.reference = prev.get("reference_checkpoint") if prev else None
            if prev is None and any(s.reducible for s in cfg.strategies):
                self.reference, _ = _train(cfg, ctx, ctx.feats.texts_of(ctx.splits.val), self.seed, self.dir,
                                           self.out, f"reference-s{self.seed}", None, val=self.seed_images,
                                           into="reference")

    def evaluate(self) -> None:
        with self.timed("evaluate_s"):
            model, _ = load_best(self.checkpoint)
            self.metrics = evaluate(model.to(self.device), self.ctx.test, self.device)

    def finish(self) -> dict:
        """The round's state.json, written atomically: the round counts as done only now."""
        prev = self.prev
        state = {"strategy": self.name, "seed": self.seed, "round": self.r, "paired_text_ids": self.paired.tolist(),
                 "paired_images": int(len(np.unique(self.ctx.feats.pairs(self.paired).image_ids))),
                 "selected": self.selected.tolist(), "annotated": (prev["annotated"] if prev else 0) + len(self.selected),
                 "checkpoint": self.checkpoint, "val_best": self.val_best, "test": self.metrics,
                 "timings": self.timings, "diagnostics": self.diagnostics, "extra_texts": list(self.extra),
                 "reference_checkpoint": self.reference, "seconds": time.perf_counter() - self.t0}
        write_json(state, self.dir / "state.json")
        return state


def _captions_from_people(cfg: LoopConfig, d: Path, name: str, seed: int, r: int, selected: np.ndarray,
                          diagnostics: dict, timings: dict, device: torch.device
                          ) -> tuple[np.ndarray, np.ndarray, str] | None:
    """annotator: manual. Before captions are imported: export the selection for people, save it
    (pending.json) and return None. After: (new text ids, the images captioned, their features)."""
    from hnal_ray.loop.manual import write_to_annotate

    captions = d / "annotations.parquet"
    if not captions.exists():
        if not (d / "pending.json").exists():
            write_to_annotate(cfg.data, selected, d / "to_annotate", f"{name}, seed {seed}, round {r}")
            write_json({"selected": selected.tolist(), "data": str(Path(cfg.data).resolve()),
                        "diagnostics": diagnostics, "timings": timings},
                       d / "pending.json")  # last: the export is complete
        return None
    features = d / "annotation_features.parquet"
    table = pq.read_table(captions)
    if not features.exists():  # encode the new captions once, with the run's text encoder
        encoder = cfg.encoders.text_encoder(device, num_threads=cfg.train.threads)
        emb = encoder.encode(table["text"].to_pylist())
        write_parquet(pa.table({"text_id": table["text_id"], "image_id": table["image_id"],
                                "embedding": embedding_array(emb)}), features)
    return (table["text_id"].to_numpy().astype(np.int64), np.unique(table["image_id"].to_numpy()).astype(np.int64),
            str(features))


def _diagnostics(ctx: Context, strategy: StrategyConfig, selected: np.ndarray, prev: dict,
                 emb: tuple[np.ndarray, np.ndarray], seed: int) -> dict:
    """selection_diagnostics for this round's picks, with the previous round's model embeddings."""
    feats, (img, txt) = ctx.feats, emb
    paired = np.asarray(prev["paired_text_ids"], np.int64)
    prow = np.flatnonzero(np.isin(feats.text_ids, paired))                 # paired texts
    irow = np.flatnonzero(np.isin(feats.image_ids, feats.text_owner[prow]))  # paired images
    owner_row = np.searchsorted(feats.image_ids, feats.text_owner)
    if strategy.side == "image":
        urow = np.flatnonzero(np.isin(feats.image_ids, ctx.splits.train) & ~np.isin(np.arange(len(img)), irow))
        return selection_diagnostics(
            selected=selected, pool_ids=feats.image_ids[urow], pool_emb=img[urow], anchor_emb=txt[prow],
            anchor_group=feats.text_owner[prow], key_emb=img[irow], key_group=feats.image_ids[irow],
            pool_frozen=feats.image_feat[urow], paired_frozen=feats.image_feat[irow],
            pool_cluster=ctx.image_cluster[urow], n_clusters=DIAGNOSTIC_CLUSTERS,
            pool_group=None if ctx.image_group is None else ctx.image_group[urow], seed=seed)
    urow = np.flatnonzero(np.isin(feats.text_owner, ctx.splits.train) & ~np.isin(feats.text_ids, paired))
    return selection_diagnostics(
        selected=selected, pool_ids=feats.text_ids[urow], pool_emb=txt[urow], anchor_emb=img[irow],
        anchor_group=feats.image_ids[irow], key_emb=txt[prow], key_group=feats.text_owner[prow],
        pool_frozen=feats.text_feat[urow], paired_frozen=feats.text_feat[prow],
        pool_cluster=ctx.image_cluster[owner_row[urow]], n_clusters=DIAGNOSTIC_CLUSTERS,
        pool_group=None if ctx.image_group is None else ctx.image_group[owner_row[urow]], seed=seed)


def _select(cfg: LoopConfig, ctx: Context, strategy: StrategyConfig, seed: int, r: int, prev: dict, d: Path,
            timings: dict, device: torch.device) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Embed paired set and pool with the previous round's model, then `hnal score` on them."""
    t = time.perf_counter()
    feats, paired = ctx.feats, np.asarray(prev["paired_text_ids"], np.int64)
    img, txt = embed_features(prev["checkpoint"], feats, device)
    paired_images = np.unique(feats.text_owner[np.isin(feats.text_ids, paired)])
    emb = d / "embeddings"
    sel_img, sel_txt = img, txt
    if strategy.features_at(int(prev["paired_images"])) == "frozen":
        # the frozen image features; the caption rows carry their image's (no strategy allowed here reads them)
        sel_img = feats.image_feat / np.maximum(np.linalg.norm(feats.image_feat, axis=1, keepdims=True), 1e-12)
        sel_txt = sel_img[np.searchsorted(feats.image_ids, feats.text_owner)]
    write_embeddings(feats, sel_img, sel_txt, emb / "paired", paired_images, np.zeros(0, np.int64))
    _write_texts(feats, sel_txt, paired, emb / "paired" / "captions.parquet")  # exactly the paired pairs
    if strategy.side == "image":
        pool = np.setdiff1d(ctx.splits.train, paired_images)
        if cfg.annotator == "oracle":  # it can only reveal captions the data has
            pool = np.intersect1d(pool, ctx.captioned_train)
        write_embeddings(feats, sel_img, sel_txt, emb / "pool", pool, np.zeros(0, np.int64))
        pool_path = emb / "pool" / "images.parquet"
    else:
        _write_texts(feats, txt, np.setdiff1d(feats.texts_of(ctx.splits.train), paired),
                     emb / "pool" / "captions.parquet", with_owner=False)
        pool_path = emb / "pool" / "captions.parquet"
    timings["embed_s"] = time.perf_counter() - t
    inputs = ScoreInputs(str(emb / "paired" / "images.parquet"), str(emb / "paired" / "captions.parquet"),
                         str(pool_path))
    score_cfg = strategy.score_config(cfg.budget, seed * 1000 + r, cfg.shards, int(prev["paired_images"]))
    t = time.perf_counter()
    summary = run_score_job(inputs, score_cfg, d / "score")
    sel = pq.read_table(d / "score" / "selection.parquet").column(0).to_numpy().astype(np.int64)
    total = time.perf_counter() - t
    scored = summary["timings"].get("thresholds_s", 0.0) + summary["timings"].get("score_s", 0.0)
    timings["score_s"], timings["select_s"] = scored, max(total - scored, 0.0)
    if strategy.reducible:
        t = time.perf_counter()
        sel = _reducible(cfg, ctx, strategy, score_cfg, prev, d, paired, paired_images, pool_path, device)
        timings["score_s"] += time.perf_counter() - t
    return sel, (img, txt)


def _reducible(cfg: LoopConfig, ctx: Context, strategy: StrategyConfig, score_cfg, prev: dict, d: Path,
               paired: np.ndarray, paired_images: np.ndarray, pool_path: Path, device: torch.device) -> np.ndarray:
    """Reducible hardness (RHO-LOSS-style): the same scores under the reference model (trained on the
    validation pairs) subtracted from the current model's; the top B of the difference."""
    from hnal_ray.score.selection import select_reducible

    feats = ctx.feats
    img, txt = embed_features(prev["reference_checkpoint"], feats, device)
    emb = d / "embeddings-reference"
    write_embeddings(feats, img, txt, emb / "paired", paired_images, np.zeros(0, np.int64))
    _write_texts(feats, txt, paired, emb / "paired" / "captions.parquet")
    pool_ids = pq.read_table(pool_path, columns=["image_id"])["image_id"].to_numpy()
    write_embeddings(feats, img, txt, emb / "pool", pool_ids, np.zeros(0, np.int64))
    ref_inputs = ScoreInputs(str(emb / "paired" / "images.parquet"), str(emb / "paired" / "captions.parquet"),
                             str(emb / "pool" / "images.parquet"))
    run_score_job(ref_inputs, score_cfg, d / "score-reference")
    cur = pq.read_table(d / "score" / "scores.parquet").sort_by("image_id")
    ref = pq.read_table(d / "score-reference" / "scores.parquet").sort_by("image_id")
    ranked = select_reducible(cur["image_id"].to_numpy(), cur["score"].to_numpy(), ref["image_id"].to_numpy(),
                              ref["score"].to_numpy(), cur["max_margin"].to_numpy(), cfg.budget)
    write_parquet(pa.table({"image_id": ranked.ids, "score": ranked.scores}), d / "selection-reducible.parquet")
    return ranked.ids


def _write_texts(feats: FeatureSet, txt: np.ndarray, text_ids: np.ndarray, path: Path,
                 with_owner: bool = True) -> None:
    keep = np.isin(feats.text_ids, text_ids)
    owner = {"image_id": feats.text_owner[keep]} if with_owner else {}
    table = pa.table({"text_id": feats.text_ids[keep], **owner,
                      "embedding": embedding_array(txt[keep])})
    write_parquet(table, path)


def _train(cfg: LoopConfig, ctx: Context, paired: np.ndarray, seed: int, d: Path, out: Path,
           name: str, init: str | None, extra_texts: tuple[str, ...] = (), val: np.ndarray | None = None,
           into: str = "checkpoint") -> tuple[str, dict]:
    """A Ray Train fit from scratch, or from `init`'s weights (a half-finished fit of an interrupted
    run is discarded, so resumed runs give the same numbers); the best checkpoint is copied into the round."""
    from hnal_ray.cluster.train import fit

    storage = out / "_train"
    shutil.rmtree(storage / name, ignore_errors=True)
    train = dataclasses.replace(cfg.train, seed=seed)
    if init and cfg.train.finetune_lr:
        train = dataclasses.replace(train, lr=cfg.train.finetune_lr)
    res = fit(cfg.features, paired, ctx.splits.val if val is None else val, train, str(storage), name,
              init_checkpoint=init, extra_texts=extra_texts)
    ckpt = d / into
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(res.checkpoint, ckpt)
    shutil.rmtree(storage / name, ignore_errors=True)
    return str(ckpt), res.best
