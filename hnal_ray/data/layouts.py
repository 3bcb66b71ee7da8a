"""The layouts `hnal data import` reads, each turned into a stream of `Record`s (one per image):
an image folder with metadata.jsonl / metadata.csv (`file_name`, `text`: the Hugging Face
imagefolder convention), img2dataset Parquet (`jpg`/`png`/`webp`/`image`, `caption`), WebDataset
tar shards (`.jpg`/`.png` + `.txt`), and plain image folders (unpaired images)."""
from __future__ import annotations

import csv
import io
import json
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.data.contract import SPLITS
from hnal_ray.io import InputError, read_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text", "captions")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val", "test": "test"}


@dataclass
class Record:
    """One source image: where it came from, its bytes, captions and optional group/split."""

    path: str
    data: bytes
    captions: list[str] = field(default_factory=list)
    group: str | None = None
    split: str | None = None


def detect_layout(src: Path) -> str:
    """imagefolder | parquet | webdataset | embeddings | folder (raises InputError otherwise)."""
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix == ".parquet":
            return "parquet"
        if src.suffix == ".tar":
            return "webdataset"
        raise InputError(f"{src}: not a layout hnal data import reads (a folder, a .parquet file or a .tar shard)")
    if (src / "metadata.jsonl").is_file() or (src / "metadata.csv").is_file():
        return "imagefolder"
    if (src / "images.parquet").exists() and "embedding" in _schema(src / "images.parquet").names:
        return "embeddings"
    if any(src.glob("*.tar")):
        return "webdataset"
    if any(src.glob("*.parquet")):
        return "parquet"
    return "folder"


def _schema(path: Path) -> pa.Schema:
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    try:
        return pq.read_schema(files[0])
    except Exception as exc:
        raise InputError(f"{files[0] if files else path}: not a readable Parquet file ({exc})") from None


def split_name(value, where: str) -> str | None:
    """A split cell as train/val/test (validation, valid, dev mean val); None when empty."""
    if value is None or value == "":
        return None
    name = SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise InputError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return name


def _captions(value, where: str) -> list[str]:
    """A caption cell: a string or a list of strings; empty strings are dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: text must be a string or a list of strings, got {value!r}")
    return [v.strip() for v in value if v.strip()]


def _metadata_rows(src: Path) -> Iterator[tuple[str, dict]]:
    if (src / "metadata.jsonl").is_file():
        f = src / "metadata.jsonl"
        for n, line in enumerate(read_text(f).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{f}: line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{f}: line {n}: expected a JSON object")
            yield f"{f}: line {n}", row
        return
    f = src / "metadata.csv"  # as spreadsheets save it: a byte-order mark, Windows-1252, long fields
    csv.field_size_limit(sys.maxsize)
    for n, row in enumerate(csv.DictReader(io.StringIO(read_text(f), newline="")), start=2):
        yield f"{f}: line {n}", row


def read_imagefolder(src: Path, skip: Callable[[str, str], None]) -> Iterator[Record]:
    """metadata rows (file_name, text, optional group/split; several rows per file = several
    captions), then the folder's image files without a row, as unpaired images."""
    records: dict[str, Record] = {}
    for where, row in _metadata_rows(src):
        if "file_name" not in row:
            raise InputError(f"{where}: missing 'file_name' (has {', '.join(row) or 'nothing'})")
        text_key = next((k for k in ("text", "caption", "captions") if k in row), None)
        if text_key is None:
            raise InputError(f"{where}: missing 'text' (has {', '.join(row)})")
        name = str(row["file_name"])
        path = (src / name).resolve()
        if src.resolve() not in path.parents:  # `../x.png`, `/etc/x.png`: never read outside the source
            raise InputError(f"{where}: file_name {name!r} is outside the source folder {src}")
        key = str(path)  # `img3.png` and `./img3.png` are one image, their captions together
        if key not in records:
            records[key] = Record(str(path), path.read_bytes()) if path.is_file() else None
            if records[key] is None:
                skip(str(src / name), "listed in the metadata but missing")
        rec = records[key]
        if rec is None:
            continue
        rec.captions += _captions(row[text_key], where)
        for key in ("group", "split"):
            value = row.get(key) or None
            value = split_name(value, where) if key == "split" else value
            old = getattr(rec, key)
            if value is not None and old is not None and old != value:
                raise InputError(f"{where}: {key} {value!r} contradicts {old!r} given earlier for {name}")
            setattr(rec, key, old or value)
    listed = set(records)
    yield from (r for r in records.values() if r is not None)
    for rec in read_folder(src, skip):
        if rec.path not in listed:
            yield rec


def read_folder(src: Path, skip: Callable[[str, str], None]) -> Iterator[Record]:
    """Every image file under src (recursively, name order), without captions; any other file (not
    hidden, not the metadata) is named as skipped."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            yield Record(str(path.resolve()), path.read_bytes())
        elif not path.name.startswith(".") and path.name not in ("metadata.jsonl", "metadata.csv"):
            skip(str(path), f"not an image file (extension {path.suffix or 'none'}; images are "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")


def read_parquet(src: Path, skip: Callable[[str, str], None]) -> Iterator[Record]:
    """img2dataset-style Parquet (a file or a folder of files): one row per image."""
    files = [src] if src.is_file() else sorted(src.glob("*.parquet"))
    for f in files:
        schema = _schema(f)
        img = next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)
        if img is None:
            raise InputError(f"{f}: no image column (one of {', '.join(PARQUET_IMAGE_COLUMNS)}; "
                             f"has {', '.join(schema.names)})")
        cap = next((c for c in CAPTION_COLUMNS if c in schema.names), None)
        extra = [c for c in ("group", "split", "status") if c in schema.names]
        columns = [img, *([cap] if cap else []), *extra]
        batches = pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns)
        for row, values in enumerate(v for batch in batches for v in batch.to_pylist()):
            where = f"{f}: row {row}"
            if values.get("status") not in (None, "success"):  # img2dataset keeps failed downloads
                continue
            data = values[img]
            if isinstance(data, dict):  # Hugging Face datasets' Image feature: {bytes, path}
                data = data.get("bytes")
            if not data:
                skip(where, "no image bytes")
                continue
            yield Record(where, data, _captions(values.get(cap), where) if cap else [],
                         values.get("group") or None, split_name(values.get("split"), where))


def read_webdataset(src: Path, skip: Callable[[str, str], None]) -> Iterator[Record]:
    """WebDataset shards: members grouped by key (path up to the first dot of the name); the image
    member (.jpg/.png/...) and the .txt caption (one caption per non-empty line)."""
    shards = [src] if src.is_file() else sorted(src.glob("*.tar"))
    for shard in shards:
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    head, _, name = m.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if dot:
                        samples.setdefault(f"{head}/{stem}" if head else stem, {})[ext.lower()] = tar.extractfile(m).read()
        except tarfile.TarError as exc:
            raise InputError(f"{shard}: not a readable tar file ({exc})") from None
        for key, parts in samples.items():
            where = f"{shard}::{key}"
            image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff") if e in parts), None)
            if image is None:
                skip(where, f"no image member (has {', '.join('.' + e for e in parts)})")
                continue
            text = parts.get("txt", b"").decode("utf-8", errors="replace")
            yield Record(where, image, [line.strip() for line in text.splitlines() if line.strip()])


READERS = {"imagefolder": read_imagefolder, "folder": read_folder, "parquet": read_parquet, "webdataset": read_webdataset}
