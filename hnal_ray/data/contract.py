"""The data folder contract (docs/data.md): three Parquet tables every data set is written as, and
`check_data_dir`, which validates a folder against it with one error naming the file, column and row.

  images.parquet    image_id int64 (unique), image binary (encoded, any format Pillow reads; the
                    name `png` of older emoji builds is read the same) or embedding list<float>
                    (precomputed features); optional group string, path string
  captions.parquet  text_id int64 (unique), image_id int64 (an image above), text string (not
                    empty; optional with precomputed embeddings), optional embedding list<float>
  split.parquet     image_id int64 (every image exactly once), split in {train, val, test}
Images without a caption are unpaired: the pool. They must be in the train split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hnal_ray.io import InputError

SPLITS = ("train", "val", "test")
IMAGE_COLUMNS = ("image", "png")
TABLES = ("images.parquet", "captions.parquet", "split.parquet")


def image_column(schema: pa.Schema) -> str | None:
    """Name of the encoded-image column of an images table (None: features are precomputed)."""
    return next((c for c in IMAGE_COLUMNS if c in schema.names), None)


def is_precomputed(data_dir: str | Path) -> bool:
    """True when the folder carries embeddings instead of image bytes (the encoders are skipped)."""
    return image_column(pq.read_schema(Path(data_dir) / "images.parquet")) is None


def _table(path: Path, columns: list[str]) -> pa.Table:
    if not path.is_file():
        raise InputError(f"{path}: missing (a data folder holds {', '.join(TABLES)}; see docs/data.md)")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    return pq.read_table(path, columns=[c for c in columns if c in schema.names])


def _first(mask: np.ndarray) -> int | None:
    """Index of the first True in `mask` (the row an error names), None when there is none."""
    return int(np.flatnonzero(mask)[0]) if mask.any() else None


def _require(path: Path, table: pa.Table, column: str, kind: str, nullable: bool = False) -> pa.ChunkedArray:
    if column not in table.column_names:
        raise InputError(f"{path}: missing column '{column}' (has {', '.join(table.column_names) or 'none'})")
    col = table.column(column)
    ok = {"int": pa.types.is_integer, "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
          "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
          "vector": lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
          and pa.types.is_floating(t.value_type)}[kind]
    if not ok(col.type):
        raise InputError(f"{path}: column '{column}' must be {kind}, found {col.type}")
    if col.null_count and not nullable:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{path}: column '{column}' row {row} is null")
    return col


def _unique_ids(path: Path, col: pa.ChunkedArray, name: str) -> np.ndarray:
    ids = col.to_numpy().astype(np.int64)
    if col.type == pa.uint64() and len(ids) and (col.to_numpy() >= 2**63).any():
        raise InputError(f"{path}: column '{name}' holds ids >= 2^63")
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(dup):
        rows = sorted(order[dup[0]:dup[0] + 2].tolist())
        raise InputError(f"{path}: column '{name}' value {ids[rows[0]]} repeats (rows {rows[0]} and {rows[1]})")
    return ids


def _dims(path: Path, col: pa.ChunkedArray) -> int:
    lengths = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False))
    if len(lengths) and (row := _first(lengths != lengths[0])) is not None:
        raise InputError(f"{path}: column 'embedding' row {row} has {lengths[row]} values, row 0 has {lengths[0]}")
    return int(lengths[0]) if len(lengths) else 0


def check_data_dir(data_dir: str | Path) -> dict:
    """Validate a data folder against the contract; returns counts. Raises InputError naming the
    file, column and row of the first problem found."""
    d = Path(data_dir)
    if not d.is_dir():
        raise InputError(f"{d}: no such data folder")
    images_path, captions_path, split_path = (d / t for t in TABLES)
    images = _table(images_path, ["image_id", *IMAGE_COLUMNS, "embedding", "group", "path"])
    image_ids = _unique_ids(images_path, _require(images_path, images, "image_id", "int"), "image_id")
    col = image_column(images.schema)
    precomputed = col is None
    if precomputed and "embedding" not in images.column_names:
        raise InputError(f"{images_path}: needs an image column ('image' bytes) or precomputed 'embedding' "
                         f"(has {', '.join(images.column_names)})")
    image_dim = _dims(images_path, _require(images_path, images, "embedding", "vector")) if precomputed else None
    if not precomputed:
        _require(images_path, images, col, "binary")
    for optional in ("group", "path"):
        if optional in images.column_names:
            _require(images_path, images, optional, "string", nullable=True)  # null: no group / path

    captions = _table(captions_path, ["text_id", "image_id", "text", "embedding"])
    _unique_ids(captions_path, _require(captions_path, captions, "text_id", "int"), "text_id")
    owners = _require(captions_path, captions, "image_id", "int").to_numpy().astype(np.int64)
    if (row := _first(~np.isin(owners, image_ids))) is not None:
        raise InputError(f"{captions_path}: row {row}: image_id {owners[row]} is not in {images_path.name}")
    if not precomputed or "text" in captions.column_names:
        texts = _require(captions_path, captions, "text", "string")
        empty = np.asarray(pc.equal(pc.utf8_trim_whitespace(texts), "").to_numpy(zero_copy_only=False))
        if (row := _first(empty)) is not None:
            raise InputError(f"{captions_path}: column 'text' row {row} is empty")
    if precomputed:
        _dims(captions_path, _require(captions_path, captions, "embedding", "vector"))
    elif "embedding" in captions.column_names:
        raise InputError(f"{captions_path}: has 'embedding' but {images_path.name} has image bytes: "
                         "embeddings go with embeddings (drop the column, or the image bytes)")

    split = _table(split_path, ["image_id", "split"])
    split_ids = _unique_ids(split_path, _require(split_path, split, "image_id", "int"), "image_id")
    names = np.asarray(_require(split_path, split, "split", "string").to_pylist(), dtype=object)
    if (row := _first(~np.isin(names, SPLITS))) is not None:
        raise InputError(f"{split_path}: row {row}: split {names[row]!r} is not one of {', '.join(SPLITS)}")
    if (row := _first(~np.isin(split_ids, image_ids))) is not None:
        raise InputError(f"{split_path}: row {row}: image_id {split_ids[row]} is not in {images_path.name}")
    missing = ~np.isin(image_ids, split_ids)
    if missing.any():
        raise InputError(f"{split_path}: image_id {image_ids[np.flatnonzero(missing)[0]]} has no split "
                         f"({int(missing.sum())} images have none)")
    captioned = np.isin(split_ids, owners)
    for name in ("val", "test"):
        if (row := _first((names == name) & ~captioned)) is not None:
            raise InputError(f"{split_path}: row {row}: image_id {split_ids[row]} is in {name} but has no caption "
                             f"(only train may hold unpaired images)")
        if not (names == name).any():
            raise InputError(f"{split_path}: the {name} split is empty (it needs captioned images)")
    paired_train = int(((names == "train") & captioned).sum())
    if paired_train < 2:
        raise InputError(f"{split_path}: the train split has {paired_train} captioned images; at least 2 are needed")
    return {"images": len(image_ids), "captions": len(owners), "paired_images": int(captioned.sum()),
            "unpaired_images": int((~captioned).sum()), "precomputed": precomputed, "image_dim": image_dim,
            "groups": "group" in images.column_names,
            **{f"{s}_images": int((names == s).sum()) for s in SPLITS}}
