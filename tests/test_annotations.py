"""The human annotation round trip: export a selection for people, validate their captions (CSV,
JSONL, Label Studio export), and a real loop that stops for annotation, imports and continues."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from hnal_ray.cli import main
from hnal_ray.data.importers import import_data
from hnal_ray.io import InputError
from hnal_ray.loop.manual import read_captions, validate, write_to_annotate
from imagedata import make_imagefolder, make_pool_folder

SELECTED = np.array([3, 5, 8])
KNOWN = np.arange(20)


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "caption"])
        w.writerows(rows)
    return path


def label_studio_export(tasks_file, path, texts_of=lambda n: [f"caption {n}"], skip=()):
    """A Label Studio JSON export of a project made from our tasks file (the documented format)."""
    tasks = json.loads(tasks_file.read_text())
    out = []
    for n, t in enumerate(tasks):
        anns = [] if n in skip else [{"id": n, "was_cancelled": False, "result": [
            {"from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": texts_of(n)}}]}]
        out.append({"id": 1000 + n, "data": t["data"], "annotations": anns})
    path.write_text(json.dumps(out))
    return path


@pytest.mark.parametrize("rows, message", [
    ([(3, "a"), (5, "b"), (8, "c"), (99, "d")], r"line 5: image_id 99 is not an image of the data set"),
    ([(3, "a"), (5, "b"), (8, "c"), (4, "d")], r"line 5: image_id 4 was not selected for annotation in R"),
    ([(3, "a"), (5, ""), (8, "c")], r"line 3: empty caption for image_id 5"),
    ([(3, "a"), (5, "b")], r"1 of 3 images selected in R have no caption \(ids \[8\]\).*--partial"),
    ([("x", "a")], r"line 2: image_id 'x' is not an integer"),
])
def test_csv_errors_name_the_line(tmp_path, rows, message):
    with pytest.raises(InputError, match=message):
        validate(read_captions(write_csv(tmp_path / "c.csv", rows)), SELECTED, KNOWN, False, "R")


def test_files_as_spreadsheets_and_label_studio_save_them(tmp_path, caplog):
    """Issue 21 (1-7): Excel's CSV UTF-8 (a byte-order mark), Windows-1252, a field over csv's
    default limit, an upper-case extension, Label Studio's CSV cell of several captions, JSON_MIN,
    and two annotators writing the same caption: read, not refused; non-text is one error."""
    rows = [(3, "café au lait"), (5, "b"), (8, "c")]
    with (tmp_path / "excel.csv").open("w", newline="", encoding="utf-8-sig") as f:   # Excel: CSV UTF-8
        w = csv.writer(f, dialect="excel")
        w.writerow(["image_id", "path", "caption"])
        w.writerows([(i, f"img{i}.png", t) for i, t in rows])
    want = [(3, "café au lait"), (5, "b"), (8, "c")]
    assert [(c.image_id, c.text) for c in read_captions(tmp_path / "excel.csv")] == want
    with (tmp_path / "win.CSV").open("w", newline="", encoding="cp1252") as f:        # Excel on Windows: "CSV"
        csv.writer(f).writerows([("image_id", "caption"), *rows])
    assert [(c.image_id, c.text) for c in read_captions(tmp_path / "win.CSV")] == want
    assert "not UTF-8; read as Windows-1252" in caplog.text
    big = "x" * 200_000                                                               # an embedded image column
    with (tmp_path / "big.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image_id", "image", "caption"), *[(i, big, t) for i, t in rows]])
    assert [(c.image_id, c.text) for c in read_captions(tmp_path / "big.csv")] == want
    with (tmp_path / "ls.csv").open("w", newline="") as f:                            # Label Studio's CSV export
        csv.writer(f).writerows([("image_id", "caption"), (3, json.dumps({"text": ["FREE button", "free"]})),
                                 (5, "b"), (8, "c")])
    assert [(c.image_id, c.text) for c in read_captions(tmp_path / "ls.csv")] == [
        (3, "FREE button"), (3, "free"), (5, "b"), (8, "c")]
    (tmp_path / "min.json").write_text(json.dumps([                                 # Label Studio's JSON_MIN
        {"id": 100, "image": "x", "image_id": 3, "caption": "a"},
        {"id": 101, "image": "x", "image_id": 5, "caption": ["b", "b2"]},
        {"id": 102, "image": "x", "image_id": 8, "caption": {"text": ["c"]}}]))
    assert [(c.image_id, c.text) for c in read_captions(tmp_path / "min.json")] == [
        (3, "a"), (5, "b"), (5, "b2"), (8, "c")]
    two = read_captions(write_csv(tmp_path / "two.csv", [(3, "a"), (5, "b"), (8, "c"), (3, " A ")]))
    kept, _ = validate(two, SELECTED, KNOWN, False, "R")                               # two annotators, one caption
    assert [(c.image_id, c.text) for c in kept] == [(3, "a"), (5, "b"), (8, "c")]
    (tmp_path / "nul.csv").write_bytes(b"image_id,caption\n3,a\n5,\x00b\n")
    with pytest.raises(InputError, match=r"nul.csv: line 3: not a text file"):
        read_captions(tmp_path / "nul.csv")
    (tmp_path / "bad.csv").write_bytes(b"image_id,caption\n3,a\n5,b\x81\n")
    with pytest.raises(InputError, match=r"bad.csv: line 3: not UTF-8 text, nor Windows-1252"):
        read_captions(tmp_path / "bad.csv")


def test_partial_import_and_several_captions_per_image(tmp_path):
    caps = read_captions(write_csv(tmp_path / "c.csv", [(3, "a"), (3, "b"), (5, ""), (8, "c")]))
    kept, missing = validate(caps, SELECTED, KNOWN, True, "R")
    assert [(c.image_id, c.text) for c in kept] == [(3, "a"), (3, "b"), (8, "c")] and missing.tolist() == [5]


def test_jsonl_and_label_studio_formats(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"image_id": 3, "captions": ["a", "b"]}\n\n{"image_id": 5, "caption": "c"}\n')
    assert [(c.image_id, c.text) for c in read_captions(tmp_path / "c.jsonl")] == [(3, "a"), (3, "b"), (5, "c")]
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"data": {"image": "x", "image_id": i}} for i in SELECTED.tolist()]))
    ls = label_studio_export(tasks, tmp_path / "export.json", texts_of=lambda n: [f"t{n}", f"u{n}"], skip={2})
    caps = read_captions(ls)
    assert [(c.image_id, c.text) for c in caps if c.text] == [(3, "t0"), (3, "u0"), (5, "t1"), (5, "u1")]
    with pytest.raises(InputError, match=r"1 of 3 images .* \(ids \[8\]\)"):
        validate(caps, SELECTED, KNOWN, False, "R")
    (tmp_path / "bad.json").write_text('[{"data": {"image": "x"}}]')
    with pytest.raises(InputError, match=r"bad.json: task 0: no data.image_id"):
        read_captions(tmp_path / "bad.json")


def test_export_files(tmp_path):
    data = tmp_path / "data"
    import_data(make_imagefolder(tmp_path / "src", 20), data)
    out = write_to_annotate(data, np.array([4, 1]), tmp_path / "to_annotate", "a title")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "images", "index.html", "label_studio_config.xml",
                                                     "label_studio_tasks.json", "selected.csv", "selected.jsonl"]
    rows = list(csv.DictReader((out / "selected.csv").open()))
    assert [r["image_id"] for r in rows] == ["1", "4"] and rows[0]["path"].endswith("img_0001.png")
    # issue 21 (12): Label Studio tasks point at full-resolution files (local-files storage), not data URIs
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    assert [t["data"]["image_id"] for t in tasks] == [1, 4]
    assert [t["data"]["image"] for t in tasks] == ["/data/local-files/?d=images/1.png", "/data/local-files/?d=images/4.png"]
    originals = dict(zip(*(pq.read_table(data / "images.parquet")[c].to_pylist() for c in ("image_id", "image"))))
    assert (out / "images" / "1.png").read_bytes() == originals[1] and (out / "images" / "4.png").read_bytes() == originals[4]
    assert 'value="$image"' in (out / "label_studio_config.xml").read_text()
    page = (out / "index.html").read_text()
    assert page.count("<img ") == 2 and 'href="images/1.png"' in page and 'href="images/4.png"' in page
    assert page.count("<textarea data-image-id=") == 2 and "captions.csv" in page
    assert "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT" in (out / "README.txt").read_text()


# ----------------------------------------------------------------------------- the loop round trip

def fill(selected_csv, path, captions_per_image=1, leave_out=0):
    rows = list(csv.DictReader(selected_csv.open()))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "caption"])
        for r in rows[leave_out:]:
            for k in range(captions_per_image):
                w.writerow([r["image_id"], r["path"], f"a drawn shape, caption {k} of image {r['image_id']}"])
    return path


@pytest.mark.ray
@pytest.mark.full
def test_loop_stops_for_people_and_continues(tmp_path, local_ray, capsys):
    data = tmp_path / "data"
    import_data(make_imagefolder(tmp_path / "src", 40, with_split=True), data, pool=make_pool_folder(tmp_path / "pool", 16))
    config = tmp_path / "run.yaml"
    config.write_text(f"""
dataset: folder
data: {data}
features: {tmp_path / 'features'}
annotator: manual
seed_size: all
budget: 4
rounds: 2
seeds: [0]
concurrency: 0
strategies:
  - {{name: random, strategy: random}}
  - {{name: hard, strategy: hard-negative}}
train: {{epochs: 2, batch_size: 16, warmup_epochs: 1, model: {{hidden: 32, embed_dim: 16}}}}
""")
    run = tmp_path / "out"
    loop = ["loop", str(config), "--out", str(run)]
    assert main(loop) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"waiting for captions: 4 images selected by (random|hard) \(seed 0, round 1\)", out)) == 2
    assert f"hnal annotations import FILE --run {run}" in out
    r1 = {s: run / s / "seed-0" / "round-1" for s in ("random", "hard")}
    pending = {s: (d / "pending.json").read_bytes() for s, d in r1.items()}
    assert main(loop) == 0  # nothing imported yet: still waiting, the selection is not redone
    assert {s: (d / "pending.json").read_bytes() for s, d in r1.items()} == pending
    assert not (r1["random"] / "state.json").exists()

    selected = {s: json.loads(pending[s])["selected"] for s in r1}
    # an unselected id is refused, naming the line; nothing is written
    bad = tmp_path / "bad.csv"
    other = next(i for i in range(60) if i not in selected["random"] + selected["hard"])
    write_csv(bad, [(i, "x") for i in selected["random"]] + [(other, "y")])
    assert main(["annotations", "import", str(bad), "--run", str(run), "--round", "random/seed-0/round-1"]) == 2
    assert re.search(rf"bad.csv: line 6: image_id {other} was not selected", capsys.readouterr().err)
    assert not list(run.glob("*/seed-0/round-1/annotations.parquet"))
    # random's round: the filled-in CSV, two captions per image; hard's: a Label Studio export
    csv_file = fill(r1["random"] / "to_annotate" / "selected.csv", tmp_path / "random.csv", captions_per_image=2)
    assert main(["annotations", "import", str(csv_file), "--run", str(run), "--round", "random/seed-0/round-1"]) == 0
    ls = label_studio_export(r1["hard"] / "to_annotate" / "label_studio_tasks.json", tmp_path / "ls.json")
    from label_studio_sdk.converter import Converter  # the JSON_MIN file Label Studio's own converter writes

    Converter((r1["hard"] / "to_annotate" / "label_studio_config.xml").read_text(), str(tmp_path),
              download_resources=False).convert_to_json_min(str(ls), str(tmp_path / "min"), is_dir=False)
    ls = next(p for p in (tmp_path / "min").rglob("*") if p.is_file())
    assert main(["annotations", "import", str(ls), "--run", str(run)]) == 0  # the one round left waiting
    assert main(["annotations", "import", str(ls), "--run", str(run)]) == 2  # nothing waits any more

    assert main(loop) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"waiting for captions: 4 images selected by \w+ \(seed 0, round 2\)", out)) == 2
    r2 = {s: run / s / "seed-0" / "round-2" for s in ("random", "hard")}
    for s, d in r2.items():
        f = fill(d / "to_annotate" / "selected.csv", tmp_path / f"{s}2.csv", leave_out=1 if s == "hard" else 0)
        assert main(["annotations", "import", str(f), "--run", str(run), "--round", f"{s}/seed-0/round-2",
                     *(["--partial"] if s == "hard" else [])]) == 0
    assert main(loop) == 0
    assert "report: " in capsys.readouterr().out

    max_data_text = pq.read_table(data / "captions.parquet")["text_id"].to_numpy().max()
    seed_texts = set(json.loads((run / "_seed-set" / "seed-0" / "round-0" / "state.json").read_text())["paired_text_ids"])
    new_ids = []
    for s in ("random", "hard"):
        s1 = json.loads((r1[s] / "state.json").read_text())
        s2 = json.loads((r2[s] / "state.json").read_text())
        ann1 = pq.read_table(r1[s] / "annotations.parquet")
        ann2 = pq.read_table(r2[s] / "annotations.parquet")
        assert sorted(s1["selected"]) == sorted(selected[s])
        assert set(s1["paired_text_ids"]) == seed_texts | set(ann1["text_id"].to_pylist())
        assert set(s2["paired_text_ids"]) == set(s1["paired_text_ids"]) | set(ann2["text_id"].to_pylist())
        assert s2["annotated"] == 4 + (3 if s == "hard" else 4)  # partial: 3 of 4 captioned
        assert s2["paired_images"] == s1["paired_images"] + len(s2["selected"])
        new_ids += ann1["text_id"].to_pylist() + ann2["text_id"].to_pylist()
        assert pq.read_table(r1[s] / "annotation_features.parquet").num_rows == ann1.num_rows
    assert min(new_ids) > max_data_text and len(set(new_ids)) == len(new_ids)
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [(m["strategy"], m["round"]) for m in metrics] == [(s, r) for s in ("random", "hard") for r in range(3)]
    assert not (run / "pending_annotation.json").exists()

    # issue 21 (11): the report of a run with people in it
    report = (run / "report.md").read_text()
    assert "## Metrics per round (one seed)" in report and " ± " not in report.split("## Metrics per round")[1]
    assert "## Captions people wrote" in report and "random/seed-0/round-1" in report and "random.csv" in report
    assert "Final models (last round): " in report and "round-2/checkpoint" in report
    n_test = pq.read_table(data / "split.parquet")["split"].to_pylist().count("test")
    assert f"the test split holds {n_test} images" in report
    assert "groups_hit" not in report  # this data has no groups

    # issue 21 (9): the captions people wrote leave the run as a new, valid data folder
    capsys.readouterr()
    assert main(["annotations", "export", "--run", str(run), "--out", str(tmp_path / "data2")]) == 0
    summary = json.loads(capsys.readouterr().out)
    written = {(i, t) for s in ("random", "hard") for d in (r1[s], r2[s])
               for i, t in zip(*(pq.read_table(d / "annotations.parquet")[c].to_pylist() for c in ("image_id", "text")))}
    caps = pq.read_table(tmp_path / "data2" / "captions.parquet")
    added = [r for r in caps.to_pylist() if r["strategy"] is not None]
    assert {(r["image_id"], r["text"]) for r in added} == written and summary["captions_added"] == len(written)
    assert {(r["strategy"], r["round"]) for r in added} == {(s, r) for s in ("random", "hard") for r in (1, 2)}
    assert all(r["imported_at"] and r["source"] for r in added)
    base = pq.read_table(data / "captions.parquet")
    assert caps.num_rows == base.num_rows + len(written)
    assert main(["data", "check", str(tmp_path / "data2")]) == 0
    assert main(["annotations", "export", "--run", str(run), "--out", str(tmp_path / "data2")]) == 2  # not empty


def test_label_studio_sdk_exports_import(tmp_path):
    """Issue 21: files written by Label Studio's own converter (label-studio-sdk): a project made of
    our config and tasks, annotated (two captions for one image, one caption with a comma and a
    quote), exported as CSV and JSON_MIN by the SDK, then read and validated as `hnal annotations
    import` reads them."""
    converter = pytest.importorskip("label_studio_sdk.converter")
    data = tmp_path / "data"
    import_data(make_imagefolder(tmp_path / "src", 20), data)
    out = write_to_annotate(data, np.array([4, 1, 7]), tmp_path / "to_annotate", "a title")
    texts = {1: ["a red square, \"big\""], 4: ["a blue circle", "a round blue shape"], 7: ["a green triangle"]}
    export = []
    for n, task in enumerate(json.loads((out / "label_studio_tasks.json").read_text())):
        export.append({"id": 100 + n, "data": task["data"], "annotations": [{"id": n, "completed_by": 1,
                       "result": [{"id": f"r{n}", "from_name": "caption", "to_name": "image", "type": "textarea",
                                   "value": {"text": texts[task["data"]["image_id"]]}}]}]})
    (tmp_path / "export.json").write_text(json.dumps(export))
    conv = converter.Converter((out / "label_studio_config.xml").read_text(), str(tmp_path), download_resources=False)
    want = sorted((i, t) for i, ts in texts.items() for t in ts)
    for fmt, method in (("csv", conv.convert_to_csv), ("json_min", conv.convert_to_json_min)):
        dest = tmp_path / fmt
        method(str(tmp_path / "export.json"), str(dest), is_dir=False, **({"sep": ","} if fmt == "csv" else {}))
        files = [p for p in dest.rglob("*") if p.is_file()]
        assert len(files) == 1, files
        caps = read_captions(files[0])
        kept, missing = validate(caps, np.array([1, 4, 7]), np.arange(20), False, "R")
        assert sorted((c.image_id, c.text) for c in kept) == want and len(missing) == 0, fmt


def test_contact_sheet_in_a_real_browser(tmp_path):
    """Issue 21 (12): index.html opened in headless Chromium: type captions (several lines for one
    image, a comma, quotes, non-ASCII), press its save button, and the downloaded captions.csv is
    read and validated as `hnal annotations import` reads it."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    data = tmp_path / "data"
    import_data(make_imagefolder(tmp_path / "src", 20), data)
    out = write_to_annotate(data, np.array([4, 1, 7]), tmp_path / "to_annotate", "a title")
    typed = {1: 'a red square, "big"\n\n  café sign  ', 4: "a blue circle\na round blue shape", 7: "a green triangle"}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto((out / "index.html").as_uri())
        assert page.locator("img").count() == 3
        for image_id, text in typed.items():
            page.fill(f"textarea[data-image-id='{image_id}']", text)
        with page.expect_download() as dl:
            page.click("#save")
        assert dl.value.suggested_filename == "captions.csv"
        dl.value.save_as(tmp_path / "captions.csv")
        browser.close()
    kept, missing = validate(read_captions(tmp_path / "captions.csv"), np.array([1, 4, 7]), np.arange(20), False, "R")
    assert sorted((c.image_id, c.text) for c in kept) == [
        (1, 'a red square, "big"'), (1, "café sign"), (4, "a blue circle"), (4, "a round blue shape"),
        (7, "a green triangle")] and len(missing) == 0
