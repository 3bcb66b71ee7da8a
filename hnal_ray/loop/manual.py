"""The human annotation round trip: selected images out for people to caption (a CSV/JSONL to fill
in, an HTML contact sheet, a Label Studio import), their captions back in, validated.

Accepted back: a Label Studio JSON export (image-captioning tasks made from our import file), a CSV
(`image_id,caption`) or JSONL (`{"image_id": .., "caption": ..}` or `"captions": [..]`); several
captions per image are several rows (or a list). Unknown or unselected ids, empty captions and
repeated captions are one error naming the file and line; a batch with uncaptioned images is an
error unless imported as partial (the uncaptioned images go back to the pool).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.data.contract import check_data_dir, image_column
from hnal_ray.data.images import ImageError, thumbnail_png
from hnal_ray.io import InputError, read_ids, read_json, read_text, write_json, write_parquet
from hnal_ray.loop.templates import TEMPLATES

log = logging.getLogger(__name__)
LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image" maxWidth="512px"/>
  <Header value="Describe the image: one caption per submission, several are welcome"/>
  <TextArea name="caption" toName="image" editable="true" maxSubmissions="10" rows="2" required="true"/>
</View>
"""
ANNOTATIONS = pa.schema([("text_id", pa.int64()), ("image_id", pa.int64()), ("text", pa.string())])


@dataclass(frozen=True)
class Caption:
    where: str        # file and line/task, for messages
    image_id: int
    text: str


# ------------------------------------------------------------------------------------ export

def write_to_annotate(data_dir: str | Path, image_ids: np.ndarray, out: str | Path, title: str) -> Path:
    """out/: images/ (each selected image at full resolution, its original bytes), selected.csv and
    selected.jsonl (fill in `caption`), index.html (a contact sheet: each thumbnail opens the image
    full size, a caption box beside it, and a button that saves captions.csv), label_studio_tasks.json
    (tasks pointing at images/ through Label Studio's local-files storage, not embedding them) +
    label_studio_config.xml, README.txt. Written whole or not at all."""
    data_dir, out = Path(data_dir), Path(out)
    ids = np.sort(np.asarray(image_ids, np.int64))
    schema = pq.read_schema(data_dir / "images.parquet")
    col = image_column(schema)
    if col is None:
        raise InputError(f"{data_dir}/images.parquet: holds embeddings, not images: nothing to show annotators")
    cols = ["image_id", col] + (["path"] if "path" in schema.names else [])
    t = pq.read_table(data_dir / "images.parquet", columns=cols, filters=[("image_id", "in", ids.tolist())])
    rows = {r["image_id"]: r for r in t.to_pylist()}
    tmp = out.with_name(f".{out.name}.tmp")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    tasks, cards = [], []
    with (tmp / "selected.csv").open("w", newline="") as fcsv, (tmp / "selected.jsonl").open("w") as fjson:
        w = csv.writer(fcsv)
        w.writerow(["image_id", "path", "caption"])
        for i in ids.tolist():
            path = rows[i].get("path") or ""
            w.writerow([i, path, ""])
            fjson.write(json.dumps({"image_id": i, "path": path, "caption": ""}) + "\n")
            name = f"images/{i}{_image_suffix(rows[i][col])}"
            (tmp / name).write_bytes(rows[i][col])
            try:
                thumb = base64.b64encode(thumbnail_png(rows[i][col], 200)).decode()
            except ImageError:
                thumb = ""
            tasks.append({"data": {"image": f"/data/local-files/?d={name}", "image_id": i, "path": path}})
            cards.append({"file": name, "thumb": thumb, "image_id": i, "name": Path(path).name})
    (tmp / "label_studio_tasks.json").write_text(json.dumps(tasks))
    (tmp / "label_studio_config.xml").write_text(LABEL_STUDIO_CONFIG)
    (tmp / "index.html").write_text(TEMPLATES.get_template("to_annotate.html.j2").render(title=title, cards=cards))
    (tmp / "README.txt").write_text(
        f"{title}\n\n{len(ids)} images to caption (ids in selected.csv; full-size files in images/).\n"
        "Either open index.html, type captions beside the images and save captions.csv; or fill the caption\n"
        "column of selected.csv (or selected.jsonl): one caption per row, copy a row for more captions of the\n"
        "same image; or, in Label Studio, serve this folder as local files (start Label Studio with\n"
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to this\n"
        "folder), create a project with label_studio_config.xml, import label_studio_tasks.json (its images\n"
        "are /data/local-files/?d=images/ID.EXT), annotate, and export JSON, JSON_MIN or CSV. Then:\n"
        "  hnal annotations import FILE --run RUN_DIR\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _image_suffix(data: bytes) -> str:
    """The file extension of encoded image bytes, from their magic number (Pillow's names)."""
    for magic, suffix in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
                          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif")):
        if data.startswith(magic):
            return suffix
    return ".webp" if data[8:12] == b"WEBP" else ".img"


# ------------------------------------------------------------------------------------ import

def read_captions(path: str | Path) -> list[Caption]:
    """Captions from a Label Studio JSON export, a CSV or a JSONL file (by extension)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_label_studio}
    read = readers.get(path.suffix.lower())  # captions.CSV as saved on Windows
    if read is None:
        raise InputError(f"{path}: expected a .csv, .jsonl or Label Studio .json export")
    return read(path)


def _image_id(value, where: str) -> int:
    try:
        out = None if isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        out = None
    if out is None or (isinstance(value, float) and out != value):
        raise InputError(f"{where}: image_id {value!r} is not an integer")
    return out


def _read_csv(path: Path) -> list[Caption]:
    csv.field_size_limit(sys.maxsize)  # Label Studio's CSV export embeds images in a column
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        names = [n.strip() for n in reader.fieldnames or []]
        reader.fieldnames = names
        text_col = next((c for c in ("caption", "text") if c in names), None)
        if "image_id" not in names or text_col is None:
            raise InputError(f"{path}: needs columns image_id and caption (has {', '.join(names) or 'none'})")
        out = []
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            out += [Caption(where, _image_id(row["image_id"], where), t) for t in _cell_captions(row[text_col] or "")]
        return out
    except csv.Error as exc:
        raise InputError(f"{path}: line {reader.line_num}: not a readable CSV row ({exc})") from None


def _cell_captions(cell: str) -> list[str]:
    """The captions of one CSV cell: plain text, or Label Studio's CSV export of a text area holding
    several (`{"text": ["a", "b"]}`), kept as several captions."""
    if cell.lstrip().startswith("{"):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return [cell]
        if isinstance(value, dict) and "text" in value:
            return _as_list(value["text"])
    return [cell]


def _read_jsonl(path: Path) -> list[Caption]:
    out = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "image_id" not in row:
            raise InputError(f"{where}: expected an object with image_id and caption")
        texts = row.get("captions", row.get("caption", row.get("text", "")))
        for text in texts if isinstance(texts, list) else [texts]:
            out.append(Caption(where, _image_id(row["image_id"], where), text if isinstance(text, str) else ""))
    return out


def _read_label_studio(path: Path) -> list[Caption]:
    try:
        tasks = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(tasks, list):
        raise InputError(f"{path}: expected a Label Studio JSON export (a list of tasks)")
    out = []
    for n, task in enumerate(tasks):
        where = f"{path}: task {n}" + (f" (id {task.get('id')})" if isinstance(task, dict) and "id" in task else "")
        if isinstance(task, dict) and "data" not in task and "image_id" in task:  # JSON_MIN: flat, one per task
            out += [Caption(where, _image_id(task["image_id"], where), t) for t in _min_captions(task.get("caption"))]
            continue
        if not isinstance(task, dict) or "image_id" not in (task.get("data") or {}):
            raise InputError(f"{where}: no data.image_id (was the project made from label_studio_tasks.json?)")
        image_id = _image_id(task["data"]["image_id"], where)
        texts = [t for a in task.get("annotations") or [] if not a.get("was_cancelled")
                 for r in a.get("result") or [] if r.get("type") == "textarea"
                 for t in _as_list((r.get("value") or {}).get("text"))]
        out += [Caption(where, image_id, t) for t in texts]  # a task nobody captioned: not annotated
    return out


def _min_captions(v) -> list[str]:
    """JSON_MIN's value of the `caption` text area: a string, a list, {"text": [...]}, or a list of
    those (one per annotator)."""
    if isinstance(v, dict):
        return _as_list(v.get("text"))
    if isinstance(v, list):
        return [t for x in v for t in _min_captions(x)]
    return _as_list(v)


def _as_list(v) -> list[str]:
    return [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]


def validate(captions: list[Caption], selected: np.ndarray, known: np.ndarray, partial: bool,
             what: str) -> tuple[list[Caption], np.ndarray]:
    """Checked captions (stripped) and the selected ids that got none. An empty caption is an error,
    or with `partial` a row left blank; uncaptioned selected images are an error unless `partial`."""
    sel, seen, kept, merged = set(np.asarray(selected).tolist()), {}, [], 0
    known = set(np.asarray(known).tolist())
    for c in captions:
        if c.image_id not in known:
            raise InputError(f"{c.where}: image_id {c.image_id} is not an image of the data set")
        if c.image_id not in sel:
            raise InputError(f"{c.where}: image_id {c.image_id} was not selected for annotation in {what}")
        text = " ".join(c.text.split())
        if not text:
            if partial:
                continue
            raise InputError(f"{c.where}: empty caption for image_id {c.image_id} (fill it, delete the row, "
                             f"or import with --partial)")
        key = (c.image_id, text.casefold())
        if key in seen:  # several annotators wrote the same caption: one caption
            merged += 1
            continue
        seen[key] = c.where
        kept.append(Caption(c.where, c.image_id, text))
    if merged:
        log.info("%d repeated caption(s) (the same text for the same image) merged", merged)
    missing = np.setdiff1d(np.asarray(selected, np.int64), [c.image_id for c in kept])
    if len(missing) and not partial:
        raise InputError(f"{len(missing)} of {len(sel)} images selected in {what} have no caption (ids "
                         f"{missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}): caption them, or import "
                         f"with --partial to add the {len(sel) - len(missing)} captioned ones (the rest go back to the pool)")
    if not kept:
        raise InputError(f"no caption in the file for the images selected in {what}")
    return kept, missing


def write_captions_table(kept: list[Caption], first_text_id: int, path: str | Path,
                         missing: np.ndarray, file: str | Path, **where) -> dict:
    """The checked captions as a captions table at `path`; returns what was imported."""
    kept = sorted(kept, key=lambda c: c.image_id)  # stable: file order within an image
    table = pa.table({"text_id": first_text_id + np.arange(len(kept), dtype=np.int64),
                      "image_id": np.asarray([c.image_id for c in kept], np.int64),
                      "text": [c.text for c in kept]}, schema=ANNOTATIONS)
    write_parquet(table, path)
    return {"file": str(Path(file).resolve()), **where, "captions": table.num_rows,
            "images": int(len(np.unique(table["image_id"].to_numpy()))),
            "uncaptioned": missing.tolist(), "partial": bool(len(missing))}


# ------------------------------------------------------------------------------------ rounds of a run

def pending_rounds(run: Path) -> list[Path]:
    """Round folders of a run that wait for captions: selection exported, nothing imported yet."""
    return sorted(p.parent for p in Path(run).glob("*/seed-*/round-*/pending.json")
                  if not (p.parent / "annotations.parquet").exists() and not (p.parent / "state.json").exists())


def next_text_id(data_dir: Path, run: Path) -> int:
    """One past the largest text id of the data set and of every caption imported into the run."""
    ids = [pq.read_table(Path(data_dir) / "captions.parquet", columns=["text_id"])["text_id"].to_numpy()]
    ids += [pq.read_table(f, columns=["text_id"])["text_id"].to_numpy()
            for f in Path(run).glob("*/seed-*/round-*/annotations.parquet")]
    return int(max((x.max() for x in ids if len(x)), default=-1)) + 1


def import_annotations(file: str | Path, run: str | Path, partial: bool = False, round_dir: str | None = None) -> dict:
    """Captions of `file` into the pending round of run `run` they belong to (its annotations.parquet);
    the next `hnal loop` continues from there. Returns what was imported."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise InputError(f"{run}: not a loop run folder (no config.json)")
    pending = [run / round_dir] if round_dir else pending_rounds(run)
    if not pending or not (pending[0] / "pending.json").is_file():
        raise InputError(f"{run}: no round waits for annotation" + (f" at {round_dir}" if round_dir else ""))
    captions = read_captions(file)
    ids = {c.image_id for c in captions}
    selections = {d: np.asarray(json.loads((d / "pending.json").read_text())["selected"], np.int64) for d in pending}
    # the round whose selection holds the most of the file's ids (then validated against it)
    overlap = {d: len(ids & set(sel.tolist())) for d, sel in selections.items()}
    best = max(overlap.values())
    matching = [d for d, n in overlap.items() if n == best]
    if len(matching) > 1:
        names = ", ".join(str(d.relative_to(run)) for d in matching)
        raise InputError(f"{file}: fits several waiting rounds equally ({names}): name one with --round")
    target = matching[0]
    if (target / "annotations.parquet").exists():
        raise InputError(f"{target}: captions were imported already")
    data_dir = Path(json.loads((target / "pending.json").read_text())["data"])
    known = pq.read_table(data_dir / "images.parquet", columns=["image_id"])["image_id"].to_numpy()
    what = str(target.relative_to(run))
    kept, missing = validate(captions, selections[target], known, partial, what)
    info = write_captions_table(kept, next_text_id(data_dir, run), target / "annotations.parquet",
                                missing, file, round=what)
    write_json(info, target / "annotations.json")
    return info


def import_standalone(file: str | Path, selection: str | Path, data_dir: str | Path, out: str | Path,
                      partial: bool = False) -> dict:
    """Captions of `file` for the images of a `hnal score` selection, validated, as a captions table
    (text_id after the data set's largest, image_id, text) at `out`."""
    selected = np.concatenate([part for _, part in read_ids(selection, "image_id")])
    known = pq.read_table(Path(data_dir) / "images.parquet", columns=["image_id"])["image_id"].to_numpy()
    kept, missing = validate(read_captions(file), selected, known, partial, str(selection))
    first = int(pq.read_table(Path(data_dir) / "captions.parquet", columns=["text_id"])["text_id"].to_numpy().max(
        initial=-1)) + 1
    return write_captions_table(kept, first, out, missing, file, out=str(out))


# ------------------------------------------------------------------------------------ captions out of a run

def export_run_captions(run: str | Path, out: str | Path) -> dict:
    """A new data folder at `out`: the run's data folder plus every caption people wrote in the run's
    rounds (`annotations.parquet`), with the round, strategy, seed, the file they came from and when
    they were imported as extra columns of captions.parquet (original captions: null there). A
    caption written for the same image in several trajectories is kept once. Valid under `hnal data
    check`; written to a temporary folder and renamed when complete."""
    run, out = Path(run), Path(out)
    config = read_json(run / "config.json") if (run / "config.json").exists() else None
    if config is None:
        raise InputError(f"{run}: not a loop run folder (no config.json)")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not empty; choose a new folder")
    data = Path(config["data"])
    base = pq.read_table(data / "captions.parquet")
    extra = [("strategy", pa.string()), ("seed", pa.int64()), ("round", pa.int64()), ("source", pa.string()),
             ("imported_at", pa.string())]
    schema = pa.schema([*ANNOTATIONS, *extra])
    rows = {name: [] for name in schema.names}
    seen = {(i, t.casefold()) for i, t in zip(base["image_id"].to_pylist(), base["text"].to_pylist())}
    for f in sorted(run.glob("*/seed-*/round-*/annotations.parquet")):
        strategy, seed, rnd = f.parent.parent.parent.name, int(f.parent.parent.name[5:]), int(f.parent.name[6:])
        meta = f.parent / "annotations.json"
        info = read_json(meta) or {}
        when = datetime.fromtimestamp((meta if meta.exists() else f).stat().st_mtime, timezone.utc)
        t = pq.read_table(f)
        for text_id, image_id, text in zip(*(t[c].to_pylist() for c in ("text_id", "image_id", "text"))):
            if (image_id, text.casefold()) in seen:
                continue
            seen.add((image_id, text.casefold()))
            for k, v in zip(rows, (text_id, image_id, text, strategy, seed, rnd, info.get("file"),
                                   when.isoformat(timespec="seconds"))):
                rows[k].append(v)
    old = base.select(ANNOTATIONS.names)
    for name, kind in extra:  # the original captions: null there
        old = old.append_column(name, pa.nulls(len(old), kind))
    new = pa.table(rows, schema=schema)
    tmp = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in ("images.parquet", "split.parquet"):
            shutil.copy2(data / name, tmp / name)
        write_parquet(pa.concat_tables([old, new]), tmp / "captions.parquet")
        summary = {"exported_from": str(run.resolve()), "data": str(data.resolve()), "captions_added": new.num_rows,
                   "images_captioned": len(set(rows["image_id"])), "check": check_data_dir(tmp)}
        write_json(summary, tmp / "summary.json")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
