"""The `hnal` command line: one parser per subcommand; bad input exits non-zero with one line."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import shlex
import signal
import sys
import threading

from hnal_ray.config import ConfigError, ModelConfig, TrainConfig
from hnal_ray.io import InputError


def _threshold_batch(v: str) -> int | None:
    if v == "full":
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'full' or an integer batch size, got {v!r}") from None


def _fractions(v: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in v.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected train,val,test fractions like 0.8,0.1,0.1, got {v!r}")
    return parts


def _workers(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {v!r}") from None


def _auto_bool(v: str) -> bool | None:
    if v not in ("auto", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {v!r}")
    return None if v == "auto" else v == "true"


_SPECIAL = {"threshold_batch": (_threshold_batch, "{full,N}"), "workers": (_workers, "{auto,N}"),
            "auto_bool": (_auto_bool, "{auto,true,false}")}  # opt(cli=...): a parser of its own


def add_config_args(p: argparse.ArgumentParser, config, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """One option per field of a config dataclass, as `opt` declared it (help, choices, default);
    `--PREFIX-NAME` with dest `PREFIX_NAME` when a prefix is given. A nested config field is skipped."""
    for f in dataclasses.fields(config):
        if f.name in skip or "help" not in f.metadata:
            continue
        name = f"{prefix}_{f.name}" if prefix else f.name
        flag, meta = "--" + name.replace("_", "-"), f.metadata
        required = f.default is dataclasses.MISSING
        kw = {"help": meta.get("help"), "dest": name} | ({"required": True} if required else {"default": f.default})
        if meta.get("cli") in _SPECIAL:
            kind, metavar = _SPECIAL[meta["cli"]]
            p.add_argument(flag, type=kind, metavar=metavar, **kw)
        elif f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=kw["help"], dest=name)
        elif meta.get("choices"):
            p.add_argument(flag, choices=list(meta["choices"]), **kw)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" | ")[0], str)
            p.add_argument(flag, type=kind, **kw)


def add_score_args(p: argparse.ArgumentParser) -> None:
    from hnal_ray.config import ScoreConfig

    p.add_argument("--paired-images", required=True, help="Parquet file/dir: image_id, embedding")
    p.add_argument("--paired-texts", required=True, help="Parquet file/dir: text_id, image_id, embedding")
    p.add_argument("--pool", required=True, help="Parquet file/dir: image_id (or text_id), embedding")
    add_config_args(p, ScoreConfig)
    p.add_argument("--out", required=True, help="output directory")


def cmd_score(a: argparse.Namespace) -> int:
    from hnal_ray.api import select
    from hnal_ray.config import ScoreConfig

    options = {f.name: getattr(a, f.name) for f in dataclasses.fields(ScoreConfig)}
    res = select(a.paired_images, a.paired_texts, a.pool, out=a.out, **options)
    print(json.dumps({"out": a.out, "selected": res.summary["counts"]["selected"],
                      "pairs_per_second": round(res.summary["pairs_per_second"])}))
    return 0


def cmd_data_example(a: argparse.Namespace) -> int:
    from hnal_ray.data.synthetic import make_example

    paths = make_example(a.out, n_images=a.images, n_pool=a.pool, dim=a.dim, seed=a.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def cmd_data_emoji(a: argparse.Namespace) -> int:
    from hnal_ray.data.emoji import build_emoji_dataset

    print(json.dumps(build_emoji_dataset(a.out, seed=a.seed, split=a.split, style=a.style)))
    return 0


def cmd_data_import(a: argparse.Namespace) -> int:
    from hnal_ray.data.importers import append_data, import_data

    def skipped(where: str, why: str) -> None:
        print(f"skipped {where}: {why}", file=sys.stderr)

    if a.append:
        s = append_data(a.src, a.out, pool=a.pool, report_skip=skipped)
        last = s["appended"][-1]
        info = {"images": s["images"], "captions": s["captions"], "appended_images": last["images"],
                "appended_captions": last["captions"], "skipped": last["skipped"]}
    else:
        s = import_data(a.src, a.out, pool=a.pool, seed=a.seed, fractions=a.fractions, report_skip=skipped)
        if s["skipped"]:
            print(f"hnal data import: skipped {s['skipped']} file(s)", file=sys.stderr)
        info = {k: s[k] for k in ("images", "captions", "unpaired_images", "skipped")}
    split = {k: s["check"][f"{k}_images"] for k in ("train", "val", "test")}
    print(json.dumps({"out": a.out, **info, "split": split}))
    return 0


def cmd_data_check(a: argparse.Namespace) -> int:
    from hnal_ray.data.contract import check_data_dir

    print(json.dumps({"data": a.dir, "valid": True, **check_data_dir(a.dir)}))
    return 0


def cmd_annotations_export(a: argparse.Namespace) -> int:
    from hnal_ray.io import read_ids
    from hnal_ray.loop.manual import export_run_captions, write_to_annotate

    if a.run:  # the captions people wrote in a run, folded into a new data folder
        if a.selection or a.data:
            raise InputError("hnal annotations export: --run DIR --out DIR, or SELECTION --data DIR --out DIR")
        print(json.dumps(export_run_captions(a.run, a.out)))
        return 0
    if not (a.selection and a.data):
        raise InputError("hnal annotations export needs SELECTION --data DIR (a selection for annotators), "
                         "or --run DIR (a run's captions as a new data folder)")
    ids = [i for _, part in read_ids(a.selection, "image_id") for i in part.tolist()]
    out = write_to_annotate(a.data, ids, a.out, f"{len(ids)} images selected in {a.selection}")
    print(json.dumps({"out": str(out), "images": len(ids)}))
    return 0


def cmd_annotations_import(a: argparse.Namespace) -> int:
    from hnal_ray.loop.manual import import_annotations, import_standalone

    if a.run:
        info = import_annotations(a.file, a.run, partial=a.partial, round_dir=a.round)
    else:
        if not (a.selection and a.data and a.out):
            raise InputError("hnal annotations import needs --run DIR, or --selection, --data and --out")
        info = import_standalone(a.file, a.selection, a.data, a.out, partial=a.partial)
    if info["uncaptioned"]:
        print(f"partial import: {len(info['uncaptioned'])} selected images without a caption go back to the pool",
              file=sys.stderr)
    print(json.dumps(info))
    return 0


def _with_ray(fn):
    """Run fn inside a Ray session (connected via --address/RAY_ADDRESS, or embedded)."""
    from hnal_ray.cluster.session import ray_session

    def run(a):
        with ray_session(getattr(a, "address", None)):
            return fn(a)
    return run


def cmd_features(a: argparse.Namespace) -> int:
    from hnal_ray.cluster.features import extract_features

    print(json.dumps(extract_features(a.data, a.out, actors=a.actors)))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from hnal_ray.cluster.train import fit
    from hnal_ray.data.splits import split_ids
    from hnal_ray.data.features import load_features
    from hnal_ray.io import write_json
    model = ModelConfig(**{f.name: getattr(a, f"model_{f.name}") for f in dataclasses.fields(ModelConfig)})
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "model"},
                      model=model)
    train_texts = load_features(a.features).texts_of(split_ids(a.data, "train"))
    res = fit(a.features, train_texts, split_ids(a.data, "val"), cfg, a.out, a.name)
    summary = {"checkpoint": res.checkpoint, "best": res.best, "last": res.last}
    write_json(summary, f"{a.out}/{a.name}.json")
    print(json.dumps(summary))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from hnal_ray.data.splits import split_ids
    from hnal_ray.device import pick_device
    from hnal_ray.data.features import load_features
    from hnal_ray.retrieval.training import evaluate, load_best

    device = pick_device("auto")
    model, _ = load_best(a.checkpoint)
    feats = load_features(a.features, image_maps=model.image_block is not None).subset(split_ids(a.data, a.split))
    print(json.dumps(evaluate(model.to(device), feats, device)))
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from hnal_ray.device import pick_device
    from hnal_ray.retrieval.embed import embed_dir

    paths = embed_dir(a.checkpoint, a.features, a.out, pick_device("auto"))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def cmd_loop(a: argparse.Namespace) -> int:
    from hnal_ray.api import run_loop
    from hnal_ray.loop.driver import AnnotationPending

    try:
        report = run_loop(a.config, a.out, a.set, a.address)
    except AnnotationPending as stop:
        again = " ".join(["hnal loop", shlex.quote(a.config), *(f"--set {shlex.quote(x)}" for x in a.set),
                          "--out", shlex.quote(a.out)])
        for r in stop.rounds:
            print(f"waiting for captions: {r['selected']} images selected by {r['strategy']} (seed {r['seed']}, "
                  f"round {r['round']}) are in {r['pending']}/to_annotate/ (selected.csv, index.html, Label Studio "
                  f"tasks); caption them, then run: hnal annotations import FILE --run {shlex.quote(a.out)} && {again}")
        return 0
    print(f"report: {report.resolve()}")
    return 0


def _add_emoji_command(sub) -> None:
    em = sub.add_parser("emoji", help="the emoji image-text set from registry packages")
    em.add_argument("--out", required=True)
    em.add_argument("--seed", type=int, default=0)
    em.add_argument("--split", default="group", choices=["group", "iid"],
                    help="group: every skin tone of an emoji in one split (default); iid: images split independently")
    em.add_argument("--style", default="twemoji", choices=["twemoji", "openmoji"],
                    help="twemoji (default) or openmoji: the same ids, captions and split drawn in OpenMoji's style")
    em.set_defaults(func=cmd_data_emoji)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score a pool and select the top B (hard negatives or a baseline)")
    add_score_args(score)
    score.set_defaults(func=cmd_score)
    data = sub.add_parser("data", help="build a data set").add_subparsers(dest="dataset", required=True)
    ex = data.add_parser("example", help="seeded synthetic embedding tables in the input contract")
    ex.add_argument("--out", required=True)
    ex.add_argument("--images", type=int, default=2000)
    ex.add_argument("--pool", type=int, default=20000)
    ex.add_argument("--dim", type=int, default=64)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=cmd_data_example)
    _add_emoji_command(data)
    im = data.add_parser("import", help="your images and captions into a data folder (docs/data.md)")
    im.add_argument("src", help="image folder with metadata.jsonl/csv, img2dataset Parquet, WebDataset .tar(s), "
                                "or a folder of precomputed embeddings")
    im.add_argument("--pool", default=None, help="unpaired images: a folder (recursive) or Parquet of images")
    im.add_argument("--out", required=True)
    im.add_argument("--seed", type=int, default=0, help="seed of the split when SRC gives none")
    im.add_argument("--fractions", type=_fractions, default=(0.8, 0.1, 0.1), help="train,val,test (default 0.8,0.1,0.1)")
    im.add_argument("--append", action="store_true",
                    help="add SRC (and --pool) to the folder --out, which hnal data import wrote: its ids, captions and "
                         "splits are kept, new images get the next ids and its seeded split")
    im.set_defaults(func=cmd_data_import)
    ck = data.add_parser("check", help="validate a data folder against the contract (exit 0 valid, 2 not)")
    ck.add_argument("dir")
    ck.set_defaults(func=cmd_data_check)
    an = sub.add_parser("annotations", help="captions from people: export a selection, import their captions")
    ans = an.add_subparsers(dest="action", required=True)
    ex_ = ans.add_parser("export", help="a selection as files for annotators (CSV, HTML, Label Studio); or, with "
                                        "--run, a run's captions folded into a new data folder")
    ex_.add_argument("selection", nargs="?", default=None, help="selection.parquet of hnal score")
    ex_.add_argument("--data", default=None, help="the data folder the pool images come from")
    ex_.add_argument("--run", default=None, help="a loop run: its data plus every caption people wrote in it")
    ex_.add_argument("--out", required=True)
    ex_.set_defaults(func=cmd_annotations_export)
    ai = ans.add_parser("import", help="captions (Label Studio JSON export, CSV or JSONL) into a run or a table")
    ai.add_argument("file")
    ai.add_argument("--run", default=None, help="the loop run waiting for them (then re-run hnal loop)")
    ai.add_argument("--round", default=None, help="STRATEGY/seed-S/round-R, when several rounds wait")
    ai.add_argument("--partial", action="store_true", help="accept a batch with uncaptioned images")
    ai.add_argument("--selection", default=None, help="without --run: the selection.parquet they caption")
    ai.add_argument("--data", default=None, help="without --run: the data folder")
    ai.add_argument("--out", default=None, help="without --run: captions.parquet to write")
    ai.set_defaults(func=cmd_annotations_import)
    fe = sub.add_parser("features", help="frozen image/text features of a data set (Ray Data job, cached)")
    fe.add_argument("--data", required=True, help="data set dir (images.parquet, captions.parquet)")
    fe.add_argument("--out", required=True)
    fe.add_argument("--actors", type=int, default=None)
    fe.add_argument("--address", default=None)
    fe.set_defaults(func=_with_ray(cmd_features))
    tr = sub.add_parser("train", help="train the dual encoder on the train split with Ray Train")
    tr.add_argument("--data", required=True, help="data set dir (for split.parquet)")
    tr.add_argument("--features", required=True)
    tr.add_argument("--out", required=True, help="Ray Train storage path")
    tr.add_argument("--name", default="train")
    add_config_args(tr, TrainConfig)
    add_config_args(tr, ModelConfig, prefix="model")
    tr.add_argument("--address", default=None)
    tr.set_defaults(func=_with_ray(cmd_train))
    ev = sub.add_parser("eval", help="Recall@K of a checkpoint on a split")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--features", required=True)
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.set_defaults(func=cmd_eval)
    eb = sub.add_parser("embed", help="model embeddings of every image and caption, in the score contract")
    eb.add_argument("--checkpoint", required=True)
    eb.add_argument("--features", required=True)
    eb.add_argument("--out", required=True)
    eb.set_defaults(func=cmd_embed)
    lp = sub.add_parser("loop", help="the active-learning loop: strategies x seeds x rounds, then a report")
    lp.add_argument("config", help="run YAML, e.g. jobs/emoji.yaml")
    lp.add_argument("--out", required=True)
    lp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set rounds=2 --set train.epochs=5")
    lp.add_argument("--address", default=None)
    lp.set_defaults(func=cmd_loop)
    from hnal_ray.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a container stop), handled like Ctrl-C: every `finally` runs, the
    embedded Ray is shut down, finished work stays for a resume."""


_TERMINATED = []


def _terminate(signum, frame):
    _TERMINATED.append(signum)  # Ray may re-raise the interrupt as a plain KeyboardInterrupt: remember why
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if not args.verbose:  # quiet by default: Ray's own chatter goes to its session logs; -v shows it
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (InputError, ConfigError) as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "dataset", None), getattr(args, "action", None))))
        print(f"hnal {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # the embedded Ray was shut down on the way out
        term = isinstance(exc, Terminated) or bool(_TERMINATED)
        print(f"hnal {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}; re-run the same command "
              f"to resume", file=sys.stderr)
        return 143 if term else 130
    except Exception as exc:
        full = _disk_full(exc)
        if full is not None:
            where = f" writing {full.filename}" if full.filename else ""
            print(f"hnal {args.command}: error: no space left on the device{where}; free some space (or choose "
                  f"another --out), then re-run the same command to resume: finished work is kept", file=sys.stderr)
            return 2
        if type(exc).__module__.startswith("ray."):  # lost past every retry: actors, nodes, objects
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            print(f"hnal {args.command}: error: the Ray cluster lost work it could not redo ({type(exc).__name__}: "
                  f"{first}); re-run the same command to resume: finished work is kept", file=sys.stderr)
            return 1
        raise


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind `exc` (raised here, or in a Ray worker and wrapped), else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc, seen = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__, seen + 1
    return None


if __name__ == "__main__":
    sys.exit(main())
