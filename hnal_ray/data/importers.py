"""`hnal data import`: the layouts people already have, written into the data folder contract.

Sources (the layout is detected): an image folder with metadata.jsonl / metadata.csv (`file_name`,
`text`: the Hugging Face imagefolder convention), a Parquet table of image bytes and captions
(img2dataset: `jpg`/`png`/`webp`/`image`, `caption`), WebDataset tar shards (`.jpg`/`.png` +
`.txt`), a plain image folder (searched recursively: unpaired images), or a folder of precomputed
embeddings (images.parquet + captions.parquet with `embedding`). An unreadable image is reported
by path and skipped; the folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.data.contract import check_data_dir
from hnal_ray.data.images import ImageError, open_rgb
from hnal_ray.data.layouts import READERS, Record, detect_layout, split_name
from hnal_ray.data.splits import assign_split
from hnal_ray.io import InputError, write_json, write_parquet

log = logging.getLogger(__name__)
ROW_GROUP = 64  # image rows per row group: photos are large, readers stream by row group
IMPORTED_BY = "hnal data import"
CAPTIONS_SCHEMA = pa.schema([("text_id", pa.int64()), ("image_id", pa.int64()),
                             ("text", pa.string())])
SPLIT_SCHEMA = pa.schema([("image_id", pa.int64()), ("split", pa.string())])


def source_fingerprint(*paths: Path | None) -> str:
    """Cheap fingerprint of the sources (names, sizes, mtimes): a re-run over unchanged sources skips."""
    h = hashlib.sha256()
    for p in filter(None, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class _Images:
    """Streams image rows into images.parquet (bounded memory), keeping groups, paths, splits."""

    def __init__(self, path: Path, first_id: int = 0):
        self.schema = pa.schema([("image_id", pa.int64()), ("image", pa.binary()), ("group", pa.string()),
                                 ("path", pa.string())])
        self.writer = pq.ParquetWriter(path, self.schema)
        self.rows: list[dict] = []
        self.groups: list[str | None] = []
        self.paths: list[str] = []
        self.splits: list[str | None] = []
        self.first_id = first_id

    def add(self, rec: Record) -> int:
        image_id = self.first_id + len(self.paths)
        self.groups.append(rec.group)
        self.paths.append(rec.path)
        self.splits.append(rec.split)
        self.rows.append({"image_id": image_id, "image": rec.data, "group": rec.group, "path": rec.path})
        if len(self.rows) == ROW_GROUP:
            self.flush()
        return image_id

    def keep(self, path: Path, seen: dict[str, tuple[str, int]]) -> None:
        """The rows of an images.parquet this module wrote, first and unchanged (one row group at a
        time); their bytes go to `seen`."""
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg)
            self.writer.write_table(t.select(self.schema.names).cast(self.schema))
            paths = t["path"].to_pylist() if "path" in t.column_names else [""] * t.num_rows
            for i, data, where in zip(t["image_id"].to_pylist(), t["image"].to_pylist(), paths):
                seen.setdefault(hashlib.sha256(data).hexdigest(), (where or f"image {i}", i))

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def import_data(src: str | Path, out: str | Path, pool: str | Path | None = None, seed: int = 0,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                report_skip: Callable[[str, str], None] | None = None) -> dict:
    """Write `out` (images/captions/split.parquet, summary.json) from `src` and an optional unpaired
    `pool`. Returns the summary; skips when `out` holds an import of the same unchanged sources."""
    src, out = Path(src), Path(out)
    pool = Path(pool) if pool is not None else None
    layout = detect_layout(src)
    pool_layout = detect_layout(pool) if pool is not None else None
    if pool_layout == "embeddings" or (layout == "embeddings" and pool is not None):
        raise InputError(f"{pool}: a pool of precomputed embeddings goes in the same embeddings folder "
                         "(images without a caption row are the pool)")
    config = {"src": str(src.resolve()), "pool": str(pool.resolve()) if pool else None, "seed": seed,
              "fractions": list(fractions), "layout": layout, "pool_layout": pool_layout,
              "sources": source_fingerprint(src, pool)}
    if out.exists() and any(out.iterdir()):
        summary = out / "summary.json"
        done = json.loads(summary.read_text()) if summary.is_file() else {}
        if done.get("builder") == IMPORTED_BY and done.get("config") == config:
            log.info("%s already holds this import; skipping", out)
            return done
        raise InputError(f"{out}: exists and is not empty; hnal data import writes only a new or empty folder")
    skipped: list[tuple[str, str]] = []

    def skip(where: str, why: str) -> None:
        skipped.append((where, why))
        (report_skip or (lambda w, y: log.warning("skipped %s: %s", w, y)))(where, why)

    tmp = out.with_name(f".{out.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        if layout == "embeddings":
            counts = _import_embeddings(src, tmp, seed, fractions)
        else:
            counts = _import_images(tmp, src, layout, pool, pool_layout, seed, fractions, skip)
        summary = {"builder": IMPORTED_BY, "config": config, **counts, "skipped": len(skipped),
                   "skipped_files": [f"{w}: {y}" for w, y in skipped[:1000]]}
        try:
            summary |= {"check": check_data_dir(tmp)}
        except InputError as exc:  # name the folder the user asked for, not the temporary one
            raise InputError(str(exc).replace(str(tmp), str(out))) from None
        write_json(summary, tmp / "summary.json")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %d images, %d captions (%d unpaired, %d skipped) in %.1f s -> %s", counts["images"],
             counts["captions"], counts["unpaired_images"], len(skipped), time.perf_counter() - t0, out)
    return summary


def _import_images(tmp: Path, src: Path, layout: str, pool: Path | None, pool_layout: str | None,
                   seed: int, fractions, skip, old: Path | None = None) -> dict:
    """images/captions/split.parquet in `tmp` from `src` and `pool`; with `old` (a folder this
    module wrote), its rows first, unchanged, and the new images get the next ids. Returns the
    counts of new images, captions and unpaired images."""
    old_captions = pq.read_table(old / "captions.parquet") if old else CAPTIONS_SCHEMA.empty_table()
    old_split = pq.read_table(old / "split.parquet") if old else SPLIT_SCHEMA.empty_table()
    old_ids = old_split["image_id"].to_numpy()
    images = _Images(tmp / "images.parquet", first_id=int(old_ids.max()) + 1 if len(old_ids) else 0)
    seen: dict[str, tuple[str, int]] = {}
    sources = [(READERS[layout](src, skip), False)]
    if pool is not None:
        sources.append((READERS[pool_layout](pool, skip), True))
    try:
        if old is not None:
            images.keep(old / "images.parquet", seen)
        new_text = list(_add_records(sources, images, seen, skip))
    finally:
        images.close()
    if not images.paths and old is None:
        raise InputError(f"{src}: no readable image was found")
    first_text = int(old_captions["text_id"].to_numpy().max()) + 1 if old_captions.num_rows else 0
    added = pa.table({"text_id": np.arange(first_text, first_text + len(new_text)),
                      "image_id": [i for i, _ in new_text], "text": [t for _, t in new_text]},
                     schema=CAPTIONS_SCHEMA)
    old_captions = old_captions.select(CAPTIONS_SCHEMA.names).cast(CAPTIONS_SCHEMA)
    write_parquet(pa.concat_tables([old_captions, added]), tmp / "captions.parquet")
    ids = np.arange(images.first_id, images.first_id + len(images.paths), dtype=np.int64)
    captioned = np.isin(ids, added["image_id"].to_numpy())
    split = _splits(ids, captioned, images.groups, images.splits, seed, fractions, images.paths,
                    require_val_test=old is None) if len(ids) else []
    new_split = pa.table({"image_id": ids, "split": split}, schema=SPLIT_SCHEMA)
    old_split = old_split.select(SPLIT_SCHEMA.names).cast(SPLIT_SCHEMA)
    write_parquet(pa.concat_tables([old_split, new_split]), tmp / "split.parquet")
    return {"images": len(ids), "captions": len(new_text),
            "unpaired_images": int((~captioned).sum())}


def _add_records(sources, images: _Images, seen: dict[str, tuple[str, int]], skip):
    """Decode every record of the (records, is_pool) sources once; a new image is added to `images`,
    one with the bytes of an image already `seen` keeps that id (its captions go to it; a pool copy
    or an uncaptioned one is skipped, named). Yields (image id, caption)."""
    for records, is_pool in sources:
        for rec in records:
            try:
                open_rgb(rec.data)
            except ImageError as exc:
                skip(rec.path, str(exc))
                continue
            digest = hashlib.sha256(rec.data).hexdigest()
            if digest in seen:  # the same image already there: one id, so never in two splits
                first, image_id = seen[digest]
                if is_pool or not rec.captions:
                    skip(rec.path, f"already imported (same bytes as {first})")
                    continue
                skip(rec.path, f"same bytes as {first}: its {len(rec.captions)} caption(s) go to that image")
            else:
                if is_pool:
                    rec.captions, rec.split = [], None
                image_id = images.add(rec)
                seen[digest] = (rec.path, image_id)
            for text in rec.captions:
                yield image_id, text


def _splits(ids: np.ndarray, captioned: np.ndarray, groups: list, given: list, seed: int, fractions,
            paths: list[str], require_val_test: bool = True) -> list[str]:
    """Given splits (all captioned images have one, or none has; unpaired images are always train),
    else a seeded split by group (an image without a group is its own group)."""
    has_split = [g is not None for g, c in zip(given, captioned) if c]
    if any(has_split) and not all(has_split):
        first = next(p for p, g, c in zip(paths, given, captioned) if c and g is None)
        raise InputError(f"{first}: has no split while other images have one (give every captioned image a "
                         f"split, or none for a seeded split)")
    keys = [g if g is not None else f"image:{i}" for i, g in zip(ids.tolist(), groups)]
    hashed = assign_split(keys, seed, fractions)
    out = ["train" if not has else (given[i] or hashed[i]) for i, has in enumerate(captioned)]
    if not any(has_split) and require_val_test:
        for name in ("val", "test"):
            if name not in {s for s, has in zip(out, captioned) if has}:
                n = len({k for k, has in zip(keys, captioned) if has})
                raise InputError(f"the seeded split (seed {seed}, fractions {list(fractions)}) put no captioned image "
                                 f"in {name}: {n} group(s) are too few; give a split column, more groups, or another "
                                 f"--seed / --fractions")
    return out


def _import_embeddings(src: Path, tmp: Path, seed: int, fractions) -> dict:
    """images.parquet (image_id, embedding, optional group/split) and captions.parquet (image_id,
    embedding, optional text_id/text) of precomputed features, copied into the contract."""
    img_path, cap_path = src / "images.parquet", src / "captions.parquet"
    images = pq.read_table(img_path)
    for c in ("image_id", "embedding"):
        if c not in images.column_names:
            raise InputError(f"{img_path}: missing column '{c}' (has {', '.join(images.column_names)})")
    if not cap_path.exists():
        raise InputError(f"{cap_path}: missing (precomputed text embeddings: image_id, embedding[, text])")
    caps = pq.read_table(cap_path)
    for c in ("image_id", "embedding"):
        if c not in caps.column_names:
            raise InputError(f"{cap_path}: missing column '{c}' (has {', '.join(caps.column_names)})")
    ids = images["image_id"].to_numpy().astype(np.int64)
    groups = images["group"].to_pylist() if "group" in images.column_names else [None] * len(ids)
    given = ([split_name(v, f"{img_path}: row {r}") for r, v in enumerate(images["split"].to_pylist())]
             if "split" in images.column_names else [None] * len(ids))
    keep = [c for c in ("image_id", "embedding", "group") if c in images.column_names]
    write_parquet(images.select(keep), tmp / "images.parquet", row_group_size=4096)
    if "text_id" not in caps.column_names:
        caps = caps.append_column("text_id", pa.array(np.arange(caps.num_rows, dtype=np.int64)))
    keep = [c for c in ("text_id", "image_id", "text", "embedding") if c in caps.column_names]
    write_parquet(caps.select(keep), tmp / "captions.parquet", row_group_size=4096)
    captioned = np.isin(ids, caps["image_id"].to_numpy())
    split = _splits(ids, captioned, groups, given, seed, fractions, [f"{img_path}: row {r}" for r in range(len(ids))])
    write_parquet(pa.table({"image_id": ids, "split": split}), tmp / "split.parquet")
    return {"images": len(ids), "captions": caps.num_rows, "unpaired_images": int((~captioned).sum())}


def append_data(src: str | Path, out: str | Path, pool: str | Path | None = None,
                report_skip: Callable[[str, str], None] | None = None) -> dict:
    """`hnal data import SRC --out OUT --append`: add SRC's images and captions (and an unpaired
    `pool`) to a folder `hnal data import` wrote. Existing ids, captions and splits are kept; new
    images get the next ids and a split by the folder's own seed and fractions (or the one SRC
    gives); an image already in the folder (same bytes) keeps its id and split and gets SRC's
    captions. The new folder is written under a temporary name and swapped in when complete; the
    same SRC appended again is skipped."""
    src, out = Path(src), Path(out)
    pool = Path(pool) if pool is not None else None
    previous = out.with_name(f".{out.name}.previous")
    if previous.exists() and not out.exists():  # interrupted between the two renames of the swap
        os.replace(previous, out)
    shutil.rmtree(previous, ignore_errors=True)
    summary_file = out / "summary.json"
    done = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if done.get("builder") != IMPORTED_BY or done.get("config", {}).get("layout") == "embeddings":
        raise InputError(f"{out}: --append adds to a folder of images that hnal data import wrote (this one "
                         f"is {'embeddings' if done.get('builder') == IMPORTED_BY else 'not such a folder'})")
    layout = detect_layout(src)
    pool_layout = detect_layout(pool) if pool is not None else None
    if "embeddings" in (layout, pool_layout):
        raise InputError(f"{src if layout == 'embeddings' else pool}: precomputed embeddings cannot be appended "
                         f"to a folder of images")
    entry = {"src": str(src.resolve()), "pool": str(pool.resolve()) if pool else None, "layout": layout,
             "pool_layout": pool_layout, "sources": source_fingerprint(src, pool)}
    if any({k: v for k, v in a.items() if k in entry} == entry for a in done.get("appended", [])):
        log.info("%s already holds %s; skipping", out, src)
        return done
    seed, fractions = done["config"]["seed"], tuple(done["config"]["fractions"])
    skipped: list[tuple[str, str]] = []

    def skip(where: str, why: str) -> None:
        skipped.append((where, why))
        (report_skip or (lambda w, y: log.warning("skipped %s: %s", w, y)))(where, why)

    tmp = out.with_name(f".{out.name}.appending")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = _import_images(tmp, src, layout, pool, pool_layout, seed, fractions, skip, old=out)
        added = entry | {k: counts[k] for k in ("images", "captions")} | {"skipped": len(skipped)}
        summary = done | {"appended": done.get("appended", []) + [added]}
        try:
            summary["check"] = check_data_dir(tmp)
        except InputError as exc:
            raise InputError(str(exc).replace(str(tmp), str(out))) from None
        summary |= {k: summary["check"][k] for k in ("images", "captions", "unpaired_images")}
        write_json(summary, tmp / "summary.json")
        os.replace(out, previous)
        os.replace(tmp, out)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("appended %d images, %d captions (%d skipped) from %s -> %s", counts["images"],
             counts["captions"], len(skipped), src, out)
    return summary
