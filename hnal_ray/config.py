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


def opt(default, help: str, choices: tuple | None = None, cli: str | None = None, key: bool | str | tuple = True,
        low: float | None = None):
    """A config field declared once: its default, its help and its choices, from which the command
    line (`cli.add_config_args`), the Python API (`api.select`), the loop's YAML (`StrategyConfig`)
    and the run key (`key_fields`) are derived. `dataclasses.MISSING` marks a required option. `cli`
    names a special command-line parser (`threshold_batch`: 'full' or an integer; `workers`: 'auto'
    or an integer; `auto_bool`: auto, true or false). `key`: whether the field decides the outputs
    (False: where or how the work runs), the strategies for which it does, or "if-set": only away from
    its default (an option added later: earlier finished runs keep their key). `low`: the least value
    (`check_fields`; None, where it is the default, is allowed)."""
    meta = {"help": help, "choices": choices, "cli": cli, "key": key, "low": low}
    return field(metadata=meta) if default is dataclasses.MISSING else field(default=default, metadata=meta)


def check_fields(cfg, prefix: str = "--") -> None:
    """Every field declared with `choices` holds one of them, and every one declared with `low` is a
    number (an integer for an int field) at least `low` (a ConfigError naming the option)."""
    for f in dataclasses.fields(cfg):
        choices, low, value = f.metadata.get("choices"), f.metadata.get("low"), getattr(cfg, f.name)
        name = prefix + (f.name.replace("_", "-") if prefix == "--" else f.name)
        if choices and value not in choices:
            raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
        integer = str(f.type).startswith("int")
        if low is not None and not (value is None and f.default is None) and not (
                (_int(value) if integer else _num(value)) and value >= low):
            # (the CLI's parser has typed a `--` option already; a Python caller may not have)
            kind = "an integer " if integer and (prefix != "--" or not _int(value)) else ""
            raise ConfigError(f"{name} must be {kind}>= {low}, got {value!r}")


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

    budget: int = opt(dataclasses.MISSING, "number of pool items to select", low=1)
    strategy: str = opt("hard-negative", "coverage: greedy hard negatives that discount the anchors earlier picks "
                        "beat; probcover, maxherding: greedy coverage of the data (delta-balls, Gaussian kernel)",
                        STRATEGIES)
    weight: str = opt("surplus", "the SPEC's weight of a beaten text", ("surplus", "counting"))
    k: int = opt(1, "threshold = k-th hardest negative (Top-k)", low=1)
    threshold_batch: int | None = opt(None, "full batch (default) or mini-batches of N pairs", cli="threshold_batch")
    side: str = opt("image", "select pool images (against the paired texts) or pool texts", SIDES)
    seed: int = opt(0, "seed of every random choice (random keys, mini-batches, k-means)")
    shards: int = opt(0, "0: in-process; N: N Ray actors taking shards from a queue", key=False, low=0)
    shard_rows: int = opt(1_000_000, "pool (and paired-key) rows per shard: the unit of work, retry and resume",
                          key=False, low=1)
    stream_rows: int = opt(65536, "rows a worker reads from Parquet at a time", key=False, low=1)
    address: str | None = opt(None, "Ray address (default: RAY_ADDRESS or an embedded Ray)", key=False)
    device: str = opt("auto", "where the kernels run", ("auto", "cpu", "cuda"))
    block_pool: int = opt(4096, "pool rows per GEMM block", low=1)
    block_anchor: int = opt(1024, "anchor rows per GEMM block", low=1)
    clusters: int = opt(0, "cluster strategy: k-means clusters (0: the budget; quota uncovered: paired items + "
                           "budget)", low=0)
    quota: str = opt("equal", "cluster strategy: picks per cluster: equal, proportional to its size, to its hard "
                     "negatives, or uncovered (TypiClust): pool and paired items clustered together, the best item "
                     "of each cluster without a paired item first, largest first", QUOTAS)
    within: str = opt("hardest", "cluster strategy: the hardest items of each cluster, random ones (the control), the "
                      "most central (nearest the centre), or the most typical (TypiClust's kNN density; with "
                      "--quota uncovered)", WITHIN)
    cluster_sample: int = opt(262144, "cluster strategy: most items the driver's FAISS start of the k-means sees",
                              low=1)
    max_points_per_centroid: int = opt(32, "cluster strategy: the k-means fit sample, at most this many items per "
                                           "cluster, pool and paired in proportion", low=1)
    fit_iters: int = opt(2, "cluster strategy: exact Lloyd steps over the fit sample on the workers "
                            "(checkpointed)", low=0)
    max_clusters: int = opt(0, "cluster strategy: cap on k (0: none; TypiClust 500)", low=0)
    min_cluster_size: int = opt(0, "quota uncovered: clusters of at most this many items are visited last "
                                   "(TypiClust 5)", low=0)
    typical_cap: int = opt(1000, "within typical: a larger cluster's typicality uses a seeded sample of about "
                                 "this many", low=2)
    wait: bool = opt(False, "wait for another run writing the same --out instead of refusing", key=False)
    candidates: int = opt(0, "coverage, probcover, maxherding: best items per shard sent to the driver's greedy "
                             "first (0: 4 x budget); 4x more until every pick is proved exact", low=0)
    support: int = opt(65536, "probcover, maxherding: most items (pool and paired, a seeded sample) whose coverage "
                              "counts", key=HERDING, low=1)
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
        check_fields(self)
        checks = [
            (self.threshold_batch is None or self.threshold_batch >= 2,
             f"--threshold-batch must be 'full' or an integer >= 2, got {self.threshold_batch}"),
            (self.within != "typical" or self.quota == "uncovered",
             "--within typical goes with --quota uncovered (TypiClust's visiting order)"),
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
    epochs: int = opt(20, "training epochs", low=1)
    batch_size: int = opt(128, "pairs per step, global: split evenly over the workers")
    lr: float = opt(1e-3, "AdamW learning rate")
    weight_decay: float = opt(1e-4, "AdamW weight decay", low=0)
    margin: float = opt(0.2, "the hinge loss's margin", low=0)
    warmup_epochs: int = opt(2, "sum-of-hinges epochs before max-of-hinges (VSE++ on small data)", low=0)
    num_workers: int | str = opt("auto", "0: Ray Train local mode (in the calling process); N: N DDP workers; auto: "
                                         "local mode unless the cluster has GPUs, then one worker per GPU",
                                 cli="workers")
    threads: int = opt(1, "torch threads per process (fixed, so numbers do not depend on the machine)", low=1)
    use_gpu: bool | None = opt(None, "train on GPUs (auto: when the cluster has them)", cli="auto_bool")
    seed: int = opt(0, "seed of the initialisation and the batches")
    max_failures: int = opt(0, "Ray Train restarts of a failed fit (from its last checkpoint)")
    checkpoint_every: int = opt(5, "epochs between checkpoints (and always the last epoch)", low=1)
    init: str = opt("scratch", "loop rounds >= 1: from scratch, or fine-tune the last round's best weights with a "
                               "fresh optimiser", ("scratch", "previous"))
    finetune_lr: float | None = opt(None, "lr when fine-tuning (default: lr)")
    model_choice: str = opt("best", "best: the epoch with the best validation rsum; average: the uniform weight "
                                    "average of the last average_epochs epochs", ("best", "average"))
    average_epochs: int = opt(10, "epochs averaged by model_choice average", low=1)
    batching: str = opt("random", "random: a seeded shuffle per epoch; clustered: batches of look-alikes (pairs "
                                  "grouped by k-means of their images' frozen features)", ("random", "clustered"))
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        ok = self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0)
        if not ok:
            raise ConfigError(f"train.num_workers must be 'auto' or an integer >= 0, got {self.num_workers!r}")
        if not (_int(self.batch_size) and self.batch_size >= 2):
            raise ConfigError(f"train.batch_size must be an integer >= 2 (a batch's other pairs are its negatives), "
                              f"got {self.batch_size!r}")
        check_fields(self, "train.")
        for name in ("lr", "finetune_lr"):
            value = getattr(self, name)
            if not (value is None and name == "finetune_lr") and not (_num(value) and value > 0):
                raise ConfigError(f"train.{name} must be > 0, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig(**d.get("model", {}))
        return cls(**d)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
