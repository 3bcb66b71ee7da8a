"""Frozen per-stage configs, loaded from YAML or the command line in one place."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

STRATEGIES = ("hard-negative", "random", "coreset", "cluster", "coverage", "probcover", "maxherding")
HERDING = ("probcover", "maxherding")  # greedy generalized coverage of a support sample (score/herding.py)
QUOTAS = ("equal", "proportional", "hardness", "uncovered")
WITHIN = ("hardest", "random", "central", "typical")
SIDES = ("image", "text")
PRECISIONS = ("fp32", "fp16", "bf16")
METHODS = ("exact", "pruned")


class ConfigError(ValueError):
    """A bad option value; the message names the option."""


def opt(default, help: str, choices: tuple | None = None, cli: str | None = None, key: bool | str | tuple = True):
    """A config field declared once: its default, its help and its choices, from which the command
    line (`cli.add_config_args`), the Python API (`api.select`), the loop's YAML (`StrategyConfig`)
    and the run key (`key_fields`) are derived. `dataclasses.MISSING` marks a required option. `cli`
    names a special command-line parser (`threshold_batch`: 'full' or an integer; `workers`: 'auto'
    or an integer; `auto_bool`: auto, true or false). `key`: whether the field decides the outputs
    (False: where or how the work runs), the strategies for which it does, or "if-set": only away from
    its default (an option added later: earlier finished runs keep their key)."""
    meta = {"help": help, "choices": choices, "cli": cli, "key": key}
    return field(metadata=meta) if default is dataclasses.MISSING else field(default=default, metadata=meta)


def check_choices(cfg, prefix: str = "--") -> None:
    """Every field declared with `choices` holds one of them (a ConfigError naming the option)."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and value not in choices:
            name = f.name.replace("_", "-") if prefix == "--" else f.name
            raise ConfigError(f"{prefix}{name} must be one of {choices}, got {value!r}")


def key_fields(cfg) -> dict:
    """The fields of a config that decide its outputs, as `opt(key=...)` declared them: a run with the
    same values is a finished run whatever its shards, actors or stream sizes (the outputs are the
    same for any of these: tests/test_ray_score.py, tests/test_streaming.py)."""
    out = {}
    for f in dataclasses.fields(cfg):
        key, value = f.metadata.get("key", True), getattr(cfg, f.name)
        if key is True or (key == "if-set" and value != f.default) or (isinstance(key, tuple) and cfg.strategy in key):
            out[f.name] = value
    return out


@dataclass(frozen=True)
class ScoreInputs:
    """Paths (file or directory of Parquet files) of the three input tables."""

    paired_images: str
    paired_texts: str
    pool: str


@dataclass(frozen=True)
class ScoreConfig:
    """What `hnal score` computes. threshold_batch None = full batch, else the mini-batch size. Block
    sizes, device and precision are in the run key: they may move a float32 sum's last bit. The
    herding options are in it only for those strategies (added later: earlier runs keep their key)."""

    budget: int = opt(dataclasses.MISSING, "number of pool items to select")
    strategy: str = opt("hard-negative", "coverage: greedy hard negatives that discount the anchors earlier picks "
                        "beat; probcover, maxherding: greedy coverage of the data (delta-balls, Gaussian kernel)",
                        STRATEGIES)
    weight: str = opt("surplus", "the SPEC's weight of a beaten text", ("surplus", "counting"))
    k: int = opt(1, "threshold = k-th hardest negative (Top-k)")
    threshold_batch: int | None = opt(None, "full batch (default) or mini-batches of N pairs", cli="threshold_batch")
    side: str = opt("image", "select pool images (against the paired texts) or pool texts", SIDES)
    seed: int = opt(0, "seed of every random choice (random keys, mini-batches, k-means)")
    shards: int = opt(0, "0: in-process; N: N Ray actors taking shards from a queue", key=False)
    shard_rows: int = opt(1_000_000, "pool (and paired-key) rows per shard: the unit of work, retry and resume",
                          key=False)
    stream_rows: int = opt(65536, "rows a worker reads from Parquet at a time", key=False)
    address: str | None = opt(None, "Ray address (default: RAY_ADDRESS or an embedded Ray)", key=False)
    device: str = opt("auto", "where the kernels run", ("auto", "cpu", "cuda"))
    block_pool: int = opt(4096, "pool rows per GEMM block")
    block_anchor: int = opt(1024, "anchor rows per GEMM block")
    clusters: int = opt(0, "cluster strategy: k-means clusters (0: the budget; quota uncovered: paired items + budget)")
    quota: str = opt("equal", "cluster strategy: picks per cluster: equal, proportional to its size, to its hard "
                     "negatives, or uncovered (TypiClust): pool and paired items clustered together, the best item "
                     "of each cluster without a paired item first, largest first", QUOTAS)
    within: str = opt("hardest", "cluster strategy: the hardest items of each cluster, random ones (the control), the "
                      "most central (nearest the centre), or the most typical (TypiClust's kNN density; with "
                      "--quota uncovered)", WITHIN)
    cluster_sample: int = opt(262144, "cluster strategy: most items the driver's FAISS start of the k-means sees")
    max_points_per_centroid: int = opt(32, "cluster strategy: the k-means fit sample, at most this many items per "
                                           "cluster, pool and paired in proportion")
    fit_iters: int = opt(2, "cluster strategy: exact Lloyd steps over the fit sample on the workers (checkpointed)")
    max_clusters: int = opt(0, "cluster strategy: cap on k (0: none; TypiClust 500)")
    min_cluster_size: int = opt(0, "quota uncovered: clusters of at most this many items are visited last "
                                   "(TypiClust 5)")
    typical_cap: int = opt(1000, "within typical: a larger cluster's typicality uses a seeded sample of about this many")
    wait: bool = opt(False, "wait for another run writing the same --out instead of refusing", key=False)
    candidates: int = opt(0, "coverage, probcover, maxherding: best items per shard sent to the driver's greedy "
                             "first (0: 4 x budget); 4x more until every pick is proved exact")
    support: int = opt(65536, "probcover, maxherding: most items (pool and paired, a seeded sample) whose coverage "
                              "counts", key=HERDING)
    purity: float = opt(0.95, "probcover: delta is the largest radius with pure balls around this share of the "
                              "support", key=HERDING)
    bandwidth: float = opt(0.0, "maxherding: the Gaussian kernel's sigma (0: the median distance to the 20th nearest "
                                "neighbour)", key=HERDING)
    precision: str = opt("fp32", "GEMM inputs; fp16/bf16 recompute the pairs their error bound cannot decide in "
                                 "float64 (the same results; for tensor cores)", PRECISIONS)
    method: str = opt("exact", "how the hard-negative scores are computed: every (pool, anchor) product, or pruned: "
                               "skip the (pool item, anchor cluster) products a bound proves add nothing (faster when "
                               "the anchors cluster; the same margins, scores summed in another float32 order; fp32 "
                               "only)", METHODS, key="if-set")

    def __post_init__(self):
        check_choices(self)
        checks = [
            (self.budget >= 1, f"--budget must be >= 1, got {self.budget}"),
            (self.k >= 1, f"--k must be >= 1, got {self.k}"),
            (self.threshold_batch is None or self.threshold_batch >= 2,
             f"--threshold-batch must be 'full' or an integer >= 2, got {self.threshold_batch}"),
            (self.shards >= 0, f"--shards must be >= 0, got {self.shards}"),
            (self.shard_rows >= 1 and self.stream_rows >= 1, "--shard-rows and --stream-rows must be >= 1"),
            (self.block_pool >= 1 and self.block_anchor >= 1, "block sizes must be >= 1"),
            (self.clusters >= 0, f"--clusters must be >= 0, got {self.clusters}"),
            (self.candidates >= 0, f"--candidates must be >= 0, got {self.candidates}"),
            (self.cluster_sample >= 1, f"--cluster-sample must be >= 1, got {self.cluster_sample}"),
            (self.max_points_per_centroid >= 1,
             f"--max-points-per-centroid must be >= 1, got {self.max_points_per_centroid}"),
            (self.fit_iters >= 0, f"--fit-iters must be >= 0, got {self.fit_iters}"),
            (self.max_clusters >= 0 and self.min_cluster_size >= 0,
             "--max-clusters and --min-cluster-size must be >= 0"),
            (self.typical_cap >= 2, f"--typical-cap must be >= 2, got {self.typical_cap}"),
            (self.within != "typical" or self.quota == "uncovered",
             "--within typical goes with --quota uncovered (TypiClust's visiting order)"),
            (self.support >= 1, f"--support must be >= 1, got {self.support}"),
            (0.0 < self.purity <= 1.0, f"--purity must be in (0, 1], got {self.purity}"),
            (self.bandwidth >= 0.0, f"--bandwidth must be >= 0 (0: automatic), got {self.bandwidth}"),
            (self.method == "exact" or self.precision == "fp32",
             "--method pruned computes in fp32; --precision fp16/bf16 is the other exact fast path, not both"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def uses_thresholds(self) -> bool:
        """Whether the selection needs the per-anchor thresholds (the hard-negative scores)."""
        return self.strategy in ("hard-negative", "coverage") or (self.strategy == "cluster" and (
            self.within == "hardest" or self.quota == "hardness"))


@dataclass(frozen=True)
class ModelConfig:
    image_dim: int = opt(1280, "image feature width (EfficientNet-Lite0 pooled features)")
    text_dim: int = opt(384, "text feature width (all-MiniLM-L6-v2 sentence embeddings)")
    embed_dim: int = opt(256, "the joint embedding's width")
    hidden: int = opt(512, "hidden width of each side's head (0: a single linear layer)")
    image_block_rank: int = opt(0, "> 0: also train a rank-r update of the image encoder's last stage (ConvHeadLoRA, "
                                   "on the cached 7x7x320 maps of data/image_maps.py)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = opt(20, "training epochs")
    batch_size: int = opt(128, "pairs per step, global: split evenly over the workers")
    lr: float = opt(1e-3, "AdamW learning rate")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    margin: float = opt(0.2, "the hinge loss's margin")
    warmup_epochs: int = opt(2, "sum-of-hinges epochs before max-of-hinges (VSE++ on small data)")
    num_workers: int | str = opt("auto", "0: Ray Train local mode (in the calling process); N: N DDP workers; auto: "
                                         "local mode unless the cluster has GPUs, then one worker per GPU", cli="workers")
    threads: int = opt(1, "torch threads per process (fixed, so numbers do not depend on the machine)")
    use_gpu: bool | None = opt(None, "train on GPUs (auto: when the cluster has them)", cli="auto_bool")
    seed: int = opt(0, "seed of the initialisation and the batches")
    max_failures: int = opt(0, "Ray Train restarts of a failed fit (from its last checkpoint)")
    checkpoint_every: int = opt(5, "epochs between checkpoints (and always the last epoch)")
    init: str = opt("scratch", "loop rounds >= 1: from scratch, or fine-tune the last round's best weights with a "
                               "fresh optimiser", ("scratch", "previous"))
    finetune_lr: float | None = opt(None, "lr when fine-tuning (default: lr)")
    model_choice: str = opt("best", "best: the epoch with the best validation rsum; average: the uniform weight "
                                    "average of the last average_epochs epochs", ("best", "average"))
    average_epochs: int = opt(10, "epochs averaged by model_choice average")
    batching: str = opt("random", "random: a seeded shuffle per epoch; clustered: batches of look-alikes (pairs "
                                  "grouped by k-means of their images' frozen features)", ("random", "clustered"))
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        ok = self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0)
        if not ok:
            raise ConfigError(f"train.num_workers must be 'auto' or an integer >= 0, got {self.num_workers!r}")
        check_choices(self, "train.")
        if not _int(self.average_epochs) or self.average_epochs < 1:
            raise ConfigError(f"train.average_epochs must be an integer >= 1, got {self.average_epochs!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"train.threads must be an integer >= 1, got {self.threads!r}")
        checks = [
            (_int(self.batch_size) and self.batch_size >= 2,
             f"train.batch_size must be an integer >= 2 (a batch's other pairs are its negatives), got {self.batch_size!r}"),
            (_int(self.epochs) and self.epochs >= 1, f"train.epochs must be an integer >= 1, got {self.epochs!r}"),
            (_num(self.lr) and self.lr > 0, f"train.lr must be > 0, got {self.lr!r}"),
            (self.finetune_lr is None or (_num(self.finetune_lr) and self.finetune_lr > 0),
             f"train.finetune_lr must be > 0, got {self.finetune_lr!r}"),
            (_num(self.weight_decay) and self.weight_decay >= 0,
             f"train.weight_decay must be >= 0, got {self.weight_decay!r}"),
            (_num(self.margin) and self.margin >= 0, f"train.margin must be >= 0, got {self.margin!r}"),
            (_int(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"train.warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}"),
            (_int(self.checkpoint_every) and self.checkpoint_every >= 1,
             f"train.checkpoint_every must be an integer >= 1, got {self.checkpoint_every!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig(**d.get("model", {}))
        return cls(**d)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
