"""The active-learning run's config: one YAML per run (jobs/*.yaml), loaded into frozen dataclasses."""
from __future__ import annotations

import dataclasses
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hnal_ray.config import ConfigError, ModelConfig, ScoreConfig, TrainConfig
from hnal_ray.data.encoders import EncoderConfig


# The score options a strategy sets; the loop sets the rest per round (budget, seed, shards) or per
# process (address, wait). Each is declared once, on ScoreConfig, with its default and help.
LOOP_SETS = ("budget", "seed", "shards", "address", "wait")
SCORE_OPTIONS = tuple(f.name for f in dataclasses.fields(ScoreConfig) if f.name not in LOOP_SETS)
# Strategy keys in every run's config.json; the rest are written only when not at their defaults,
# so runs made before they existed stay resumable.
KEYED_ALWAYS = ("name", "strategy", "weight", "k", "threshold_batch", "side", "clusters", "quota", "within",
                "switch_at", "then")


class _Strategy:
    """One selection strategy: a name for plots and the `hnal score` options (every ScoreConfig field
    but LOOP_SETS, with its default), plus the loop's own:
    - reducible: hard-negative only: minus the score under a reference model trained on the validation
      pairs (RHO-LOSS-style: hardness the model can reduce);
    - switch_at / then: budget-aware: from this many paired images on, the options in `then` replace
      these ones;
    - features: what selection sees: the previous round's model embeddings ("model"), or the frozen
      encoder features ("frozen": image side, strategies that do not use the texts)."""

    def __post_init__(self):
        if not (isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.name)):
            raise ConfigError(f"strategies: name {self.name!r} must be one path segment (letters, digits, '.', "
                              f"'_', '-', not starting with '.', '_' or '-'): it names the strategy's folder")
        if self.reducible and (self.strategy != "hard-negative" or self.side != "image" or self.switch_at):
            raise ConfigError(f"strategies: {self.name}: reducible goes with strategy: hard-negative on the image side")
        if self.features not in ("model", "frozen") or (self.then or {}).get("features", "model") not in ("model", "frozen"):
            raise ConfigError(f"strategies: {self.name}: features must be 'model' or 'frozen', got {self.features!r} / {short_repr(self.then)}")
        if (self.switch_at is None) != (self.then is None):
            raise ConfigError(f"strategies: {self.name}: switch_at and then go together")
        if self.then is not None:
            allowed = set(SCORE_OPTIONS) - {"side"} | {"features"}
            if not isinstance(self.then, dict) or set(self.then) - allowed:
                raise ConfigError(f"strategies: {self.name}: then may set only {sorted(allowed)}, got "
                                  f"{short_repr(self.then)}")
            check_types(type(self), self.then, f"strategies: {self.name}: then.", set(), partial=True)

    def score_config(self, budget: int, seed: int, shards: int, paired_images: int = 0) -> ScoreConfig:
        """The `hnal score` options for a round that starts with `paired_images` paired images."""
        opts = {name: getattr(self, name) for name in SCORE_OPTIONS}
        if self.switch_at is not None and paired_images >= self.switch_at:
            opts |= self.then
        opts.pop("features", None)
        cfg = ScoreConfig(budget=budget, seed=seed, shards=shards, **opts)
        if self.features_at(paired_images) == "frozen" and (cfg.uses_thresholds or self.side != "image"):
            raise ConfigError(f"strategies: {self.name}: features: frozen goes with image-side strategies that do "
                              f"not use the texts (random, cluster without hardness, probcover, maxherding, coreset)")
        return cfg

    def features_at(self, paired_images: int) -> str:
        """"model" or "frozen": what the round that starts with `paired_images` paired images selects on."""
        if self.switch_at is not None and paired_images >= self.switch_at:
            return self.then.get("features", self.features)
        return self.features


StrategyConfig = dataclasses.make_dataclass(
    "StrategyConfig",
    [("name", "str")]
    + [(f.name, f.type, field(default=f.default, metadata=f.metadata))
       for f in dataclasses.fields(ScoreConfig) if f.name in SCORE_OPTIONS]
    + [("reducible", "bool", field(default=False)), ("switch_at", "int | None", field(default=None)),
       ("then", "dict | None", field(default=None)), ("features", "str", field(default="model"))],
    bases=(_Strategy,), frozen=True)
StrategyConfig.__module__ = __name__  # pickled by reference (Ray tasks), so it must be found here


@dataclass(frozen=True)
class LoopConfig:
    data: str                       # data folder (docs/data.md)
    features: str                   # frozen features dir (extracted if missing)
    dataset: str = "emoji"          # emoji: `data` is built with `hnal data emoji` if missing;
                                    # folder: your own folder (`hnal data import`), never written
    seed_size: int | str = 300      # paired images at round 0 (drawn from the train split's captioned
                                    # images), or "all": every captioned train image
    budget: int = 100               # pool items annotated per round
    rounds: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[StrategyConfig, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    shards: int = 0                 # Ray actors per scoring job; 0 = in the round's own process
    concurrency: int | str = "auto"  # rounds run at once as Ray tasks; 0 = all in the driver; auto = one
                                     # per GPU, or per `train.threads` CPUs on a CPU cluster
    data_subset: int | None = None  # build the data set from this many images only (smoke runs)
    data_split: str = "group"       # emoji build: "group" (unseen families at test time) or "iid"
    data_style: str = "twemoji"     # emoji build: "twemoji", or "openmoji" (same ids, captions and split)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    annotator: str = "oracle"       # oracle: reveal the data's held-back captions (experiments);
                                    # manual: stop after selection for a person to caption the picks

    def __post_init__(self):
        if not self.strategies:
            raise ConfigError("strategies: at least one strategy is needed")
        if not self.seeds:
            raise ConfigError("seeds: at least one seed is needed")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct integers >= 0, got {list(self.seeds)}")
        for key, value in (("rounds", self.rounds), ("budget", self.budget)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ConfigError(f"strategies: names must be unique, got {names}")
        for s in self.strategies:
            s.score_config(self.budget, 0, self.shards)  # validates each strategy's options
            if s.switch_at is not None:
                s.score_config(self.budget, 0, self.shards, s.switch_at)
        if (self.seed_size != "all" and not (isinstance(self.seed_size, int) and self.seed_size >= 2)) \
                or self.rounds < 0:
            raise ConfigError(f"seed_size must be an integer >= 2 or 'all', and rounds >= 0 "
                              f"(got {self.seed_size!r}, {self.rounds})")
        if self.dataset not in ("emoji", "folder"):
            raise ConfigError(f"dataset must be 'emoji' or 'folder', got {self.dataset!r}")
        if self.annotator not in ("oracle", "manual"):
            raise ConfigError(f"annotator must be 'oracle' or 'manual', got {self.annotator!r}")
        if self.annotator == "manual" and any(s.side != "image" for s in self.strategies):
            raise ConfigError("annotator: manual captions selected images; every strategy needs side: image")
        if self.data_split not in ("group", "iid"):
            raise ConfigError(f"data_split must be 'group' or 'iid', got {self.data_split!r}")
        if self.data_style not in ("twemoji", "openmoji"):
            raise ConfigError(f"data_style must be 'twemoji' or 'openmoji', got {self.data_style!r}")
        if not (self.concurrency == "auto" or (isinstance(self.concurrency, int) and self.concurrency >= 0)):
            raise ConfigError(f"concurrency must be 'auto' or an integer >= 0, got {self.concurrency!r}")

    def result_fields(self) -> dict:
        """The fields that decide the numbers (not where or how many rounds run at once). Fields added
        later are left out while at their defaults, so runs made before them stay resumable."""
        d = dataclasses.asdict(self)
        for f in ("concurrency", "shards"):
            d.pop(f)
        for f, default in (("dataset", "emoji"), ("annotator", "oracle"), ("data_style", "twemoji"),
                           ("encoders", dataclasses.asdict(EncoderConfig()))):
            if d[f] == default:
                d.pop(f)
        defaults = {f.name: f.default for f in dataclasses.fields(StrategyConfig)}
        d["strategies"] = [{k: v for k, v in s.items() if k in KEYED_ALWAYS or v != defaults[k]}
                           for s in d["strategies"]]
        return d


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key=value` or `section.key=value` (value parsed as YAML) on top of the YAML's values."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return raw


def load_loop_config(path: str | Path, overrides: list[str] = ()) -> LoopConfig:
    """Parse a run YAML (+ overrides); relative data/features paths are relative to the cwd.
    Every error names the key and the expected type."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    raw = apply_overrides(raw, list(overrides))
    try:
        strategies = raw.pop("strategies", [])
        if not isinstance(strategies, list) or not all(isinstance(x, dict) for x in strategies):
            raise ConfigError("strategies must be a list of mappings, e.g. [{name: random, strategy: random}]")
        strategies = tuple(StrategyConfig(**check_types(StrategyConfig, s, f"strategies[{i}].", {}))
                           for i, s in enumerate(strategies))
        train = raw.pop("train", {}) or {}
        if not isinstance(train, dict):
            raise ConfigError(f"train must be a mapping, got {train!r}")
        model = train.pop("model", {}) or {}
        if not isinstance(model, dict):
            raise ConfigError(f"train.model must be a mapping, got {model!r}")
        model = ModelConfig(**check_types(ModelConfig, model, "train.model.", {}))
        train = TrainConfig(**check_types(TrainConfig, train, "train.", {"model"}), model=model)
        encoders = raw.pop("encoders", {}) or {}
        if not isinstance(encoders, dict):
            raise ConfigError(f"encoders must be a mapping, e.g. {{image: efficientnet-lite0}}, got {encoders!r}")
        encoders = EncoderConfig(**check_types(EncoderConfig, encoders, "encoders.", set()))
        cfg = LoopConfig(**check_types(LoopConfig, raw, "", {"strategies", "train", "encoders"}),
                         strategies=strategies, train=train, encoders=encoders)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return dataclasses.replace(cfg, seeds=tuple(cfg.seeds))


def check_types(cls, values: dict, prefix: str, nested: set[str], partial: bool = False) -> dict:
    """Unknown keys and values of the wrong type (by the dataclass's annotations) are ConfigErrors
    naming the key, e.g. `budget must be an integer, got 'abc'`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields or key in nested:
            known = ", ".join(sorted(set(fields) - nested))
            raise ConfigError(f"{prefix}{key}: unknown key (known: {known})")
        want = str(fields[key].type)
        if not _fits(value, want):
            raise ConfigError(f"{prefix}{key} must be {_describe(want)}, got {short_repr(value)}")
    missing = [n for n, f in fields.items() if n not in values and n not in nested
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing and not partial:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    return values


def short_repr(value, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: an error line stays one line (a YAML alias bomb
    expands to megabytes)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxdict = 8
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


_KINDS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "dict": lambda v: isinstance(v, dict),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
          "None": lambda v: v is None,
          "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(_KINDS["int"](x) for x in v)}
_NAMES = {"dict": "a mapping", "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "null",
          "tuple[int, ...]": "a list of integers"}


def _fits(value, annotation: str) -> bool:
    kinds = [k.strip() for k in annotation.split("|")]
    return any(_KINDS[k](value) for k in kinds if k in _KINDS) or not any(k in _KINDS for k in kinds)


def _describe(annotation: str) -> str:
    return " or ".join(_NAMES.get(k.strip(), k.strip()) for k in annotation.split("|"))
