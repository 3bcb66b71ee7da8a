"""`hnal data import` and `hnal data check` on real files: image folders with metadata, img2dataset
Parquet, WebDataset tars, unpaired pools, precomputed embeddings, corrupt images, bad folders."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hnal_ray.cli import main
from hnal_ray.data.contract import check_data_dir
from hnal_ray.data.features import copy_precomputed, load_features
from hnal_ray.data.importers import detect_layout, import_data
from hnal_ray.io import InputError, embedding_array
from imagedata import make_imagefolder, make_img2dataset_parquet, make_pool_folder, make_webdataset


def tables(d):
    return {n: pq.read_table(d / f"{n}.parquet") for n in ("images", "captions", "split")}


def test_imagefolder_with_pool_and_a_corrupt_jpeg(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src", 30, n_unlisted=2, corrupt=True)
    pool = make_pool_folder(tmp_path / "pool", 8)
    assert main(["data", "import", str(src), "--pool", str(pool), "--out", str(tmp_path / "data")]) == 0
    out, err = capsys.readouterr()
    assert f"skipped {src / 'images' / 'broken.jpg'}: not a readable image" in err
    assert "skipped 1 file(s)" in err
    summary = json.loads(out)
    assert summary["images"] == 30 + 2 + 8 and summary["skipped"] == 1 and summary["unpaired_images"] == 10
    t = tables(tmp_path / "data")
    meta = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    listed = [m for m in meta if m["file_name"] != "images/broken.jpg"]
    assert t["captions"].num_rows == len(listed) == summary["captions"]
    # one image row per distinct file; each caption row points at its file
    paths = dict(zip(t["images"]["image_id"].to_pylist(), t["images"]["path"].to_pylist()))
    assert len(set(paths.values())) == len(paths) == 40
    for text, owner in zip(t["captions"]["text"].to_pylist(), t["captions"]["image_id"].to_pylist()):
        assert {"file_name": str(paths[owner]).split("/src/")[1], "text": text} in [
            {"file_name": m["file_name"], "text": m["text"]} for m in listed]
    # the pool and the unlisted images are unpaired and in train
    unpaired = np.setdiff1d(t["images"]["image_id"].to_numpy(), t["captions"]["image_id"].to_numpy())
    split = dict(zip(t["split"]["image_id"].to_pylist(), t["split"]["split"].to_pylist()))
    assert len(unpaired) == 10 and {split[i] for i in unpaired.tolist()} == {"train"}
    # a group never straddles splits
    groups = dict(zip(t["images"]["image_id"].to_pylist(), t["images"]["group"].to_pylist()))
    by_group = {}
    for i, g in groups.items():
        if i not in unpaired:
            by_group.setdefault(g, set()).add(split[i])
    assert all(len(s) == 1 for s in by_group.values())
    assert main(["data", "check", str(tmp_path / "data")]) == 0


def test_rerun_skips_and_a_foreign_folder_is_refused(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src", 30)
    first = import_data(src, tmp_path / "data")
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "data").iterdir()}
    assert import_data(src, tmp_path / "data") == first
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "data").iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["data", "import", str(src), "--out", str(tmp_path / "mine")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_csv_metadata_with_given_split(tmp_path):
    src = make_imagefolder(tmp_path / "src", 25, meta="csv", with_split=True)
    import_data(src, tmp_path / "data")
    t = tables(tmp_path / "data")
    split = dict(zip(t["split"]["image_id"].to_pylist(), t["split"]["split"].to_pylist()))
    files = dict(zip(t["images"]["image_id"].to_pylist(), t["images"]["path"].to_pylist()))
    want = ("train", "train", "train", "val", "test")
    assert all(split[i] == want[int(files[i][-8:-4]) % 5] for i in split)


def test_bad_metadata_names_the_line_and_writes_nothing(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src", 10)
    with (src / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "images/img_0001.png", "text": "ok"}\n{oops\n')
    assert main(["data", "import", str(src), "--out", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src / 'metadata.jsonl'}: line" in err[0] and "not valid JSON" in err[0]
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data*"))


def test_split_mixing_given_and_missing_is_an_error(tmp_path):
    src = make_imagefolder(tmp_path / "src", 10, with_split=True)
    with (src / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "images/img_0001.png", "text": "ok", "split": "bogus"}\n')
    with pytest.raises(InputError, match=r"metadata.jsonl: line \d+: split 'bogus' is not one of train, val, test"):
        import_data(src, tmp_path / "data")


def test_img2dataset_parquet(tmp_path):
    src = make_img2dataset_parquet(tmp_path / "shard.parquet", 24)
    assert detect_layout(src) == "parquet"
    s = import_data(src, tmp_path / "data")
    assert s["images"] == 24 and s["captions"] == 24 and s["skipped"] == 0  # the failed download row is not an image
    assert check_data_dir(tmp_path / "data")["paired_images"] == 24


def test_webdataset_tar(tmp_path):
    src = make_webdataset(tmp_path / "00000.tar", 20)
    assert detect_layout(src) == "webdataset"
    skipped = []
    s = import_data(src, tmp_path / "data", report_skip=lambda w, y: skipped.append(w))
    assert s["images"] == 20 and s["captions"] == sum(1 + i % 2 for i in range(20))
    assert skipped == [f"{src}::shard/orphan"]


def test_precomputed_embeddings_skip_the_encoders(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "emb"
    src.mkdir()
    n = 40
    pq.write_table(pa.table({"image_id": np.arange(n) * 7, "embedding": embedding_array(rng.normal(size=(n, 12))),
                             "split": ["train"] * 30 + ["val"] * 5 + ["test"] * 5}), src / "images.parquet")
    owners = np.repeat(np.arange(35) * 7, 2)  # 5 train images stay unpaired
    owners = np.concatenate([owners[:50], np.arange(30, 40).repeat(2) * 7])
    pq.write_table(pa.table({"image_id": owners, "embedding": embedding_array(rng.normal(size=(len(owners), 8)))}),
                   src / "captions.parquet")
    assert detect_layout(src) == "embeddings"
    s = import_data(src, tmp_path / "data")
    assert s["check"]["precomputed"] and s["check"]["image_dim"] == 12 and s["unpaired_images"] == 5
    copy_precomputed(tmp_path / "data", tmp_path / "features")
    feats = load_features(tmp_path / "features")
    assert feats.image_feat.shape == (n, 12) and feats.text_feat.shape == (len(owners), 8)
    np.testing.assert_allclose(np.linalg.norm(feats.image_feat, axis=1), 1, atol=1e-5)


# ----------------------------------------------------------------------------- hnal data check

@pytest.fixture
def valid(tmp_path):
    import_data(make_imagefolder(tmp_path / "src", 30), tmp_path / "data")
    return tmp_path / "data"


def rewrite(path, fn):
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "split.parquet").unlink(), r"split.parquet: missing"),
    (lambda d: rewrite(d / "images.parquet", lambda t: t.set_column(0, "image_id", pa.array(
        [0] + t["image_id"].to_pylist()[:-1], pa.int64()))), r"images.parquet: column 'image_id' value 0 repeats"),
    (lambda d: rewrite(d / "captions.parquet", lambda t: t.set_column(1, "image_id", pa.array(
        t["image_id"].to_pylist()[:-1] + [999], pa.int64()))), r"captions.parquet: row \d+: image_id 999 is not in"),
    (lambda d: rewrite(d / "captions.parquet", lambda t: t.set_column(2, "text", pa.array(
        ["  "] + t["text"].to_pylist()[1:]))), r"captions.parquet: column 'text' row 0 is empty"),
    (lambda d: rewrite(d / "split.parquet", lambda t: t.set_column(1, "split", pa.array(
        ["holdout"] + t["split"].to_pylist()[1:]))), r"split.parquet: row 0: split 'holdout' is not one of"),
    (lambda d: rewrite(d / "images.parquet", lambda t: t.drop_columns(["image"])), r"needs an image column"),
])
def test_check_names_file_column_and_row(valid, capsys, breakage, message):
    breakage(valid)
    assert main(["data", "check", str(valid)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    import re
    assert re.search(message, err[0]), err[0]


def test_check_rejects_an_uncaptioned_test_image(valid):
    caps = pq.read_table(valid / "captions.parquet")
    split = pq.read_table(valid / "split.parquet")
    test_ids = [i for i, s in zip(split["image_id"].to_pylist(), split["split"].to_pylist()) if s == "test"]
    keep = ~np.isin(caps["image_id"].to_numpy(), test_ids[:1])
    pq.write_table(caps.filter(pa.array(keep)), valid / "captions.parquet")
    with pytest.raises(InputError, match=f"image_id {test_ids[0]} is in test but has no caption"):
        check_data_dir(valid)


def test_emoji_builder_refuses_a_folder_it_did_not_write(valid, capsys):
    before = sorted(p.name for p in valid.iterdir())
    assert main(["data", "emoji", "--out", str(valid)]) == 2
    assert "not written by hnal data emoji" in capsys.readouterr().err
    assert sorted(p.name for p in valid.iterdir()) == before
    shutil.rmtree(valid)


@pytest.mark.ray
def test_an_unreadable_image_in_a_hand_made_folder_is_one_line_from_the_feature_step(tmp_path, capsys, local_ray):
    """A folder that passes `hnal data check` (types only) but holds bytes that are not an image:
    the feature job (Ray Data actors) ends with one line naming the file and the image id."""
    import_data(make_imagefolder(tmp_path / "src", 12, with_split=True), tmp_path / "data")
    t = pq.read_table(tmp_path / "data" / "images.parquet")
    images = t["image"].to_pylist()
    images[7] = b"\xff\xd8\xff not really a jpeg"
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary())),
                   tmp_path / "data" / "images.parquet")
    assert main(["data", "check", str(tmp_path / "data")]) == 0
    capsys.readouterr()
    assert main(["features", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "feat")]) == 2
    err = capsys.readouterr().err  # Ray Data's progress log comes first; the error is the last line
    # (Ray's own log handler may print a "Logging error" traceback here, when it still holds an
    # earlier test's captured stderr: pytest's doing, not the command's)
    assert "UserCodeException" not in err and "RayTaskError" not in err, err[-2000:]
    assert "images.parquet: image_id 7: not a readable image" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "feat" / "images.parquet").exists()


def test_one_image_under_two_names_is_one_image(tmp_path):
    """Issue 23 (9): `img.png` and `./img.png`, or a byte-identical copy, are one image id (so never
    in two splits) holding every caption; a file_name outside the source folder is refused."""
    src = make_imagefolder(tmp_path / "src", 12)
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    first = rows[0]["file_name"]
    shutil.copy(src / first, src / "copy-of-first.png")
    rows += [{"file_name": "./" + first, "text": "the same file, written another way"},
             {"file_name": "copy-of-first.png", "text": "a byte-identical copy"}]
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "import", str(src), "--out", str(tmp_path / "data")]) == 0
    t = tables(tmp_path / "data")
    assert t["images"].num_rows == 12
    owner = dict(zip(t["captions"]["text"].to_pylist(), t["captions"]["image_id"].to_pylist()))
    same = {owner[rows[0]["text"]], owner["the same file, written another way"], owner["a byte-identical copy"]}
    assert len(same) == 1 and t["captions"].num_rows == len(rows)
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [
        {"file_name": "../outside.png", "text": "not ours"}]))
    (tmp_path / "outside.png").write_bytes((src / first).read_bytes())
    with pytest.raises(InputError, match=r"line \d+: file_name '../outside.png' is outside the source folder"):
        import_data(src, tmp_path / "data2")
    assert not (tmp_path / "data2").exists()


def test_a_file_that_is_not_an_image_is_named(tmp_path, capsys):
    """Issue 21 (8): notes.txt in a pool folder is reported as skipped, as the README says."""
    src = make_imagefolder(tmp_path / "src", 6)
    pool = make_pool_folder(tmp_path / "pool", 3)
    (pool / "notes.txt").write_text("taken on a Tuesday")
    assert main(["data", "import", str(src), "--pool", str(pool), "--out", str(tmp_path / "data")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {pool / 'notes.txt'}: not an image file (extension .txt" in err and "skipped 1 file(s)" in err


@pytest.mark.parametrize("encoding", ["utf-8-sig", "cp1252"])
def test_metadata_csv_as_spreadsheets_save_it(tmp_path, encoding, caplog):
    """Issue 21: a metadata.csv saved by Excel (byte-order mark; or Windows-1252 with a non-ASCII
    caption) and a field longer than csv's default limit are imported, captions intact."""
    import csv as csv_mod

    src = make_imagefolder(tmp_path / "src", 6, meta="csv")
    rows = list(csv_mod.DictReader((src / "metadata.csv").open(newline="")))
    rows[0]["text"] = "café crème, brûlée"
    rows[1]["text"] = "long " + "x" * 200_000
    with (src / "metadata.csv").open("w", newline="", encoding=encoding) as f:
        w = csv_mod.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import_data(src, tmp_path / "out")
    texts = pq.read_table(tmp_path / "out" / "captions.parquet")["text"].to_pylist()
    assert "café crème, brûlée" in texts and any(t.startswith("long xxx") and len(t) > 200_000 for t in texts)
    assert ("read as Windows-1252" in caplog.text) == (encoding == "cp1252")


def test_append_keeps_what_is_there_and_adds_the_rest(tmp_path, capsys):
    """Issue 21: `hnal data import SRC --out OUT --append`: the folder's ids, captions and splits are
    untouched; new images take the next ids and the folder's seeded split; an image already there
    (same bytes) keeps its id and split and gets the new captions; the same SRC again is skipped."""
    from hnal_ray.data.splits import assign_split

    first = make_imagefolder(tmp_path / "a", 20, n_unlisted=2)
    out = tmp_path / "data"
    assert main(["data", "import", str(first), "--out", str(out), "--seed", "2"]) == 0
    before = {n: pq.read_table(out / f"{n}.parquet") for n in ("images", "captions", "split")}
    more = make_imagefolder(tmp_path / "b", 6, seed=1)
    shutil.copy(first / "images" / "img_0001.png", more / "images" / "again.png")  # same bytes as an image of a
    with (more / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "images/again.png", "text": "the same picture, new words"}) + "\n")
    capsys.readouterr()
    assert main(["data", "import", str(more), "--out", str(out), "--append"]) == 0
    printed = json.loads(capsys.readouterr().out)
    after = {n: pq.read_table(out / f"{n}.parquet") for n in ("images", "captions", "split")}
    for n, t in before.items():
        assert after[n].slice(0, t.num_rows).select(t.column_names).equals(t), n
    new = after["images"].slice(before["images"].num_rows)
    first_new = before["images"]["image_id"].to_numpy().max() + 1
    assert new["image_id"].to_pylist() == list(range(first_new, first_new + 6)) and printed["appended_images"] == 6
    old_id = before["images"].filter(pa.compute.match_substring(before["images"]["path"], "img_0001"))["image_id"][0].as_py()
    added = after["captions"].slice(before["captions"].num_rows)
    assert "the same picture, new words" in added.filter(pa.compute.equal(added["image_id"], old_id))["text"].to_pylist()
    assert added["text_id"].to_numpy().min() == before["captions"]["text_id"].to_numpy().max() + 1
    want = assign_split([g if g is not None else f"image:{i}" for i, g in zip(new["image_id"].to_pylist(),
                                                                             new["group"].to_pylist())], 2, (0.8, 0.1, 0.1))
    assert after["split"].slice(before["split"].num_rows)["split"].to_pylist() == want
    check_data_dir(out)
    summary = json.loads((out / "summary.json").read_text())
    assert main(["data", "import", str(more), "--out", str(out), "--append"]) == 0  # again: skipped
    assert json.loads((out / "summary.json").read_text()) == summary
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    assert main(["data", "import", str(more), "--out", str(tmp_path / "foreign"), "--append"]) == 2
    assert "--append adds to a folder of images that hnal data import wrote" in capsys.readouterr().err
