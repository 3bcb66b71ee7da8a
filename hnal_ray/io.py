"""Parquet embedding tables in, validated arrays out; atomic writes of every output file.

Input contract (a directory of Parquet files is read as one table, files in name order):
  paired images: image_id int64, embedding list<float32>
  paired texts:  text_id int64, image_id int64 (owner), embedding list<float32>
  pool:          image_id (image side) or text_id (text side) int64, embedding list<float32>
Embeddings are L2-normalised here, by the reader, so every kernel sees unit vectors.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


NORMALISE_ROWS = 8192
STREAM_BUFFER = 8 << 20  # bytes read ahead per stream: pages are decoded as batches are taken


class InputError(ValueError):
    """Bad user input; the message names the file and the column or row."""


@dataclass(frozen=True)
class EmbeddingTable:
    """ids: (n,) int64; emb: (n, d) float32 L2-normalised; owner: (n,) int64 or None."""

    path: str
    ids: np.ndarray
    emb: np.ndarray
    owner: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.emb.shape[1]


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files that make up the table at `path` (a file or a directory)."""
    p = Path(path)
    if p.is_dir():
        files = []
        seen = set()
        for root, dirs, names in os.walk(p, followlinks=True):  # a symlinked sub-folder is part of the table
            real = os.path.realpath(root)
            if real in seen:  # a link back up the tree: each folder once
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
            for name in names:
                f = Path(root) / name
                if name.startswith((".", "_")) or not name.endswith(".parquet"):
                    continue
                if not f.exists():
                    raise InputError(f"{f}: a broken symlink in the table's folder {p} (its target "
                                     f"{os.readlink(f)} is missing)")
                files.append(f)
        if not files:
            raise InputError(f"{p}: directory holds no .parquet files")
        return sorted(files)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    return [p]


def _open(f: Path) -> pq.ParquetFile:
    try:
            return pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{f}: not a readable Parquet file ({exc})") from None


def row_counts(path: str | os.PathLike) -> list[tuple[Path, int]]:
    """(file, number of rows) for each file of the table, from the footers only."""
    return [(f, _open(f).metadata.num_rows) for f in parquet_files(path)]


def _require(f: Path, schema: pa.Schema, columns: list[str]) -> None:
    for c in columns:
        if c not in schema.names:
            raise InputError(f"{f}: missing column '{c}' (has {', '.join(schema.names) or 'none'})")


def _int_column(f: Path, table: pa.Table, name: str, row0: int) -> np.ndarray:
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise InputError(f"{f}: column '{name}' must be int64, found {col.type}")
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{f}: column '{name}' row {row0 + bad} is null")
    values = col.to_numpy()
    if values.dtype.kind == "u" and values.dtype.itemsize == 8:  # uint64: only while it fits int64
        over = np.flatnonzero(values > np.iinfo(np.int64).max)
        if len(over):
            r = int(over[0])
            raise InputError(f"{f}: column '{name}' row {row0 + r}: id {int(values[r])} does not fit int64")
    return values.astype(np.int64, copy=False)


def _embedding_column(f: Path, table: pa.Table, row0: int, dim: int | None) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)) or not pa.types.is_floating(col.type.value_type):
        raise InputError(f"{f}: column 'embedding' must be list<float32>, found {col.type}")
    n = len(col)
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{f}: column 'embedding' row {row0 + bad} is null")
    if n == 0:
        return np.zeros((0, dim or 0), np.float32)
    lengths = pc.list_value_length(col).to_numpy()
    want = dim if dim is not None else int(lengths[0])
    off = np.flatnonzero(lengths != want)
    if len(off):
        r = int(off[0])
        raise InputError(f"{f}: column 'embedding' row {row0 + r} has length {lengths[r]}, expected {want}"
                         + ("" if dim is None else " (the dimension of the other inputs)"))
    if want == 0:
        raise InputError(f"{f}: column 'embedding' has zero-length vectors")
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    emb = np.asarray(values, dtype=np.float32).reshape(n, want)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        raise InputError(f"{f}: column 'embedding' row {row0 + r} contains NaN or inf")
    out = np.empty_like(emb)
    for i in range(0, n, NORMALISE_ROWS):  # float64 in slices: no (n, d) float64 copy of a block
        part = emb[i:i + NORMALISE_ROWS].astype(np.float64)
        norms = np.linalg.norm(part, axis=1)
        if (norms == 0).any():
            r = i + int(np.flatnonzero(norms == 0)[0])
            raise InputError(f"{f}: column 'embedding' row {row0 + r} is the zero vector (cannot be L2-normalised)")
        out[i:i + NORMALISE_ROWS] = part / norms[:, None]
    return out


def read_embeddings(path: str | os.PathLike, id_column: str, owner_column: str | None = None,
                    dim: int | None = None, start: int = 0, stop: int | None = None) -> EmbeddingTable:
    """Read rows [start, stop) of an embedding table, validated and L2-normalised.

    Rows are numbered across the table's files in order; errors name the file and its own row.
    Only row groups overlapping the range are read, so a shard costs its own size.
    """
    columns = [id_column] + ([owner_column] if owner_column else []) + ["embedding"]
    ids, embs, owners = [], [], []
    for f, pf, lo, hi in _file_ranges(path, columns, start, stop):
        table = _read_range(f, pf, columns, lo, hi)
        ids.append(_int_column(f, table, id_column, lo))
        if owner_column:
            owners.append(_int_column(f, table, owner_column, lo))
        emb = _embedding_column(f, table, lo, dim)
        dim = dim if dim is not None or len(emb) == 0 else emb.shape[1]
        embs.append(emb)
    if not ids:
        return EmbeddingTable(str(path), np.zeros(0, np.int64), np.zeros((0, dim or 0), np.float32),
                              np.zeros(0, np.int64) if owner_column else None)
    d = dim or 0
    emb = np.concatenate([e.reshape(-1, d) for e in embs]) if d else np.zeros((0, 0), np.float32)
    return EmbeddingTable(str(path), np.concatenate(ids), emb,
                          np.concatenate(owners) if owner_column else None)


def row_group_starts(path: str | os.PathLike) -> np.ndarray:
    """Global row number at which each row group of the table starts, plus the total at the end
    (footers only): where a table can be cut without two readers decoding the same group."""
    starts, pos = [], 0
    for f, _ in row_counts(path):
        md = _open(f).metadata
        for g in range(md.num_row_groups):
            starts.append(pos)
            pos += md.row_group(g).num_rows
    return np.asarray(starts + [pos], np.int64)


def iter_embeddings(path: str | os.PathLike, id_column: str, owner_column: str | None = None,
                    dim: int | None = None, start: int = 0, stop: int | None = None,
                    batch_rows: int = 65536):
    """Rows [start, stop) of an embedding table as EmbeddingTable chunks of at most `batch_rows`
    rows, validated and L2-normalised like `read_embeddings`; memory is set by `batch_rows` (and the
    files' pages), never by the range. Only row groups overlapping the range are read."""
    columns = [id_column] + ([owner_column] if owner_column else []) + ["embedding"]
    for f, pf, lo, hi in _file_ranges(path, columns, start, stop):
        groups, row = _overlapping_groups(pf, lo, hi)
        try:
            # a buffered, single-threaded reader: Arrow then holds about one batch, not the whole range
            stream = pq.ParquetFile(f, pre_buffer=False, buffer_size=STREAM_BUFFER)
            batches = stream.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns,
                                          use_threads=False)
            for batch in batches:
                a, b = max(lo - row, 0), min(hi - row, batch.num_rows)
                row0, row = row, row + batch.num_rows
                if a >= b:
                    if row >= hi:
                        break
                    continue
                table = pa.Table.from_batches([batch.slice(a, b - a)])
                emb = _embedding_column(f, table, row0 + a, dim)
                dim = dim if dim is not None or len(emb) == 0 else emb.shape[1]
                yield EmbeddingTable(str(f), _int_column(f, table, id_column, row0 + a), emb,
                                     _int_column(f, table, owner_column, row0 + a) if owner_column else None)
                if row >= hi:
                    break
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{f}: rows {lo}-{hi} cannot be read ({str(exc).splitlines()[0]})") from None


def read_rows(path: str | os.PathLike, id_column: str, rows: np.ndarray, dim: int | None = None) -> EmbeddingTable:
    """The given global rows (sorted, unique) of an embedding table, reading one row group at a time
    and only the groups that hold some of them: a sample of a table larger than memory."""
    rows = np.asarray(rows, np.int64)
    ids, embs, offset = [], [], 0
    for f, n in row_counts(path):
        mine = rows[(rows >= offset) & (rows < offset + n)] - offset
        offset += n
        if not len(mine):
            continue
        pf = _open(f)
        _require(f, pf.schema_arrow, [id_column, "embedding"])
        pos = 0
        for g in range(pf.metadata.num_row_groups):
            m = pf.metadata.row_group(g).num_rows
            take = mine[(mine >= pos) & (mine < pos + m)]
            if len(take):
                table = read_groups(f, pf, [g], [id_column, "embedding"]).take(pa.array(take - pos))
                ids.append(_int_column(f, table, id_column, pos))
                embs.append(_embedding_column(f, table, pos, dim))
                dim = dim or embs[-1].shape[1]
            pos += m
    if not ids:
        return EmbeddingTable(str(path), np.zeros(0, np.int64), np.zeros((0, dim or 0), np.float32))
    return EmbeddingTable(str(path), np.concatenate(ids), np.concatenate(embs))


def _file_ranges(path: str | os.PathLike, columns: list[str], start: int, stop: int | None):
    """(file, its ParquetFile, local lo, local hi) for each file of the table holding rows of the
    global range [start, stop), its columns checked."""
    offset = 0
    for f, n in row_counts(path):
        lo, hi = max(start - offset, 0), n if stop is None else min(stop - offset, n)
        offset += n
        if lo < hi:
            pf = _open(f)
            _require(f, pf.schema_arrow, columns)
            yield f, pf, lo, hi


def _overlapping_groups(pf: pq.ParquetFile, lo: int, hi: int) -> tuple[list[int], int]:
    """The row groups of one file that overlap its rows [lo, hi), and the first one's first row."""
    groups, first, pos = [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        m = pf.metadata.row_group(g).num_rows
        if pos + m > lo and pos < hi:
            first = first if groups else pos
            groups.append(g)
        pos += m
    return groups, first


def _read_range(pf_path: Path, pf: pq.ParquetFile, columns: list[str], lo: int, hi: int) -> pa.Table:
    """Rows [lo, hi) of one file, reading only the row groups that overlap them."""
    groups, first = _overlapping_groups(pf, lo, hi)
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    table = read_groups(Path(pf_path), pf, groups, columns)
    return table.slice(lo - first, hi - lo)


def read_groups(f: Path, pf: pq.ParquetFile, groups: list[int] | None, columns: list[str]) -> pa.Table:
    """Row groups of one file (None: all); a corrupt page, failed decompression or truncated group
    becomes one InputError naming the file and the row group."""
    groups = list(range(pf.metadata.num_row_groups)) if groups is None else groups
    parts = []
    for g in groups:
        try:
            parts.append(pf.read_row_group(g, columns=columns))
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise InputError(f"{f}: row group {g} of {pf.metadata.num_row_groups} cannot be read "
                             f"({str(exc).splitlines()[0]})") from None
    return pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(columns)


def read_ids(path: str | os.PathLike, id_column: str) -> list[tuple[Path, np.ndarray]]:
    """Only the id column of each file: cheap, used to validate a sharded table on the driver."""
    out = []
    for f, _ in row_counts(path):
        pf = _open(f)
        _require(f, pf.schema_arrow, [id_column])
        out.append((f, _int_column(f, read_groups(f, pf, None, [id_column]), id_column, 0)))
    return out


def check_unique(parts: list[tuple[Path, np.ndarray]], column: str) -> None:
    """Raise naming the file and row of the first id that repeats an earlier one."""
    seen: dict[int, tuple[Path, int]] = {}
    allids = np.concatenate([ids for _, ids in parts]) if parts else np.zeros(0, np.int64)
    uniq, counts = np.unique(allids, return_counts=True)
    if (counts == 1).all():
        return
    dup = set(uniq[counts > 1].tolist())
    for f, ids in parts:
        for r, i in enumerate(ids.tolist()):
            if i in dup:
                if i in seen:
                    pf, pr = seen[i]
                    raise InputError(f"{f}: column '{column}' row {r}: duplicate id {i} (first at {pf} row {pr})")
                seen[i] = (f, r)


# ----------------------------------------------------------------------------- atomic outputs

def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_parquet(table: pa.Table, path: str | os.PathLike, row_group_size: int | None = None) -> Path:
    """Write `table` to a temporary name beside `path`, then rename: readers never see half a file.
    `row_group_size` rows per row group (default: pyarrow's, up to 1M rows in one group)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
    os.replace(tmp, path)
    return path


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Atomic JSON write (sorted keys, so equal content gives equal bytes), flushed to disk before the
    rename, so a power cut leaves the old file or the new one, never an empty one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object written by `write_json`, or None when the file is missing, empty or cut short (a
    crash of a system without the fsync): the step that wrote it is then done again."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        logging.getLogger(__name__).warning("%s: empty or damaged; the step that wrote it is done again", path)
        return None
    return value if isinstance(value, dict) else None


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


LIST_OFFSET_MAX = 2**31 - 1


def embedding_array(emb: np.ndarray) -> pa.Array:
    """(n, d) float32 -> list<float32> Arrow column, the input contract's `embedding`."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if n * d >= LIST_OFFSET_MAX:  # int32 offsets would wrap (8.4M rows at d 256): 64-bit offsets
        return pa.LargeListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int64)),
                                             pa.array(emb.reshape(-1)))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), pa.array(emb.reshape(-1)))


def read_text(path: Path) -> str:
    """A text file as spreadsheets and editors save it: UTF-8 with or without Excel's byte-order
    mark, else Windows-1252 (Excel's "CSV" on Western Windows), told in the log; a file that is not
    text (a NUL byte, or bytes no encoding here maps) is one error naming the line."""
    data = path.read_bytes()
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not a text file (a NUL byte; save it as CSV UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf8_error = exc
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        line = data[:utf8_error.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text, nor Windows-1252 (byte 0x{data[utf8_error.start]:02x}); "
                         f"save it as CSV UTF-8") from None
    log.warning("%s: not UTF-8; read as Windows-1252 (from byte %d)", path, utf8_error.start)
    return text
