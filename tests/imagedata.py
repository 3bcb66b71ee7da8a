"""Real image files for import tests: shapes drawn with Pillow (PNG and JPEG, odd sizes) with captions
in the layouts people have (imagefolder + metadata.jsonl/csv, img2dataset Parquet, WebDataset tar)."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 210, 20),
           "black": (10, 10, 10), "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle", "cross")


def shape_image(i: int, rng: np.random.Generator) -> tuple[Image.Image, list[str], str]:
    """Image i: a coloured shape on a tinted background, its captions and its group (the shape)."""
    colour = list(COLOURS)[i % len(COLOURS)]
    shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    w, h = int(rng.integers(60, 160)), int(rng.integers(60, 160))
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    m = min(w, h)
    box = (w / 2 - m / 3, h / 2 - m / 3, w / 2 + m / 3, h / 2 + m / 3)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    else:
        d.rectangle((box[0], h / 2 - m / 10, box[2], h / 2 + m / 10), fill=fill)
        d.rectangle((w / 2 - m / 10, box[1], w / 2 + m / 10, box[3]), fill=fill)
    captions = [f"a {colour} {shape}", f"a picture of a {shape} coloured {colour}"][: 1 + i % 2]
    return img, captions, f"{colour}-{shape}"


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_imagefolder(root: Path, n: int, n_unlisted: int = 0, seed: int = 0, meta: str = "jsonl",
                     corrupt: bool = False, with_split: bool = False) -> Path:
    """root/images/*.png|jpg with root/metadata.jsonl (one row per caption: several rows for an image
    with two captions) plus `n_unlisted` images without a row (unpaired), and a corrupt JPEG."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n + n_unlisted):
        img, caps, group = shape_image(i, rng)
        ext, fmt = ("jpg", "JPEG") if i % 3 == 0 else ("png", "PNG")
        name = f"images/img_{i:04d}.{ext}"
        (root / name).write_bytes(encode(img, fmt))
        if i < n:
            split = ("train", "train", "train", "val", "test")[i % 5]
            rows += [{"file_name": name, "text": c, "group": group, **({"split": split} if with_split else {})}
                     for c in caps]
    if corrupt:
        (root / "images" / "broken.jpg").write_bytes(encode(Image.new("RGB", (99, 99)), "JPEG")[:200])
        rows.append({"file_name": "images/broken.jpg", "text": "a broken file", "group": "none"})
    if meta == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with (root / "metadata.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def make_pool_folder(root: Path, n: int, seed: int = 1) -> Path:
    """Unpaired images in nested folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, _, _ = shape_image(i + 7, rng)
        f = root / f"part{i % 2}" / f"pool_{i:04d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(encode(img, "PNG"))
    return root


def make_img2dataset_parquet(path: Path, n: int, seed: int = 2) -> Path:
    """img2dataset's Parquet output: key, caption, jpg bytes, status (one failed download row)."""
    rng = np.random.default_rng(seed)
    rows = {"key": [], "caption": [], "jpg": [], "status": []}
    for i in range(n):
        img, caps, _ = shape_image(i, rng)
        rows["key"].append(f"{i:09d}")
        rows["caption"].append(caps[0])
        rows["jpg"].append(encode(img, "JPEG"))
        rows["status"].append("success")
    rows["key"].append("failed"), rows["caption"].append("lost"), rows["jpg"].append(None)
    rows["status"].append("failed_to_download")
    pq.write_table(pa.table(rows), path)
    return path


def make_webdataset(path: Path, n: int, seed: int = 3) -> Path:
    """One tar shard: NNN.jpg + NNN.txt (captions one per line), and a sample with no image."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(n):
            img, caps, _ = shape_image(i, rng)
            add(f"shard/{i:05d}.jpg", encode(img, "JPEG"))
            add(f"shard/{i:05d}.txt", "\n".join(caps).encode())
        add("shard/orphan.txt", b"a caption without an image")
    return path
