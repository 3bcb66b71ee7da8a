"""The main job end to end: jobs/smoke.yaml on a local Ray (a subprocess, as a user runs it):
the report, numbers independent of how many rounds run at once, and a killed run resuming."""
import collections
import html.parser
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def loop_cmd(out, sets):
    return [sys.executable, "-m", "hnal_ray.cli", "loop", "jobs/smoke.yaml", "--out", str(out), *sets]


def html_tables(text: str) -> list[list[list[str]]]:
    """Every <table> of a page as rows of cell texts (the standard library's parser, not the report's code)."""
    class Tables(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.tables[-1][-1].append(self.cell.strip())
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Tables()
    parser.feed(text)
    return parser.tables


def loop(out, sets):
    return subprocess.run(loop_cmd(out, sets), cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run with up to 3 rounds at once (data and features built here, shared below)."""
    root = tmp_path_factory.mktemp("smoke")
    sets = ["--set", f"data={root}/data", "--set", f"features={root}/features"]
    r = loop(root / "out", sets + ["--set", "concurrency=3"])
    assert r.returncode == 0, r.stderr[-4000:]
    return root, sets, r


def test_smoke_run_writes_the_report(smoke):
    root, _, run = smoke
    out = root / "out"
    assert f"report: {out / 'report.html'}" in run.stdout
    for name in ("report.html", "report.md", "curves.png", "metrics.parquet", "timings.parquet"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert sorted((r["strategy"], r["round"]) for r in rows) == [
        (s, k) for s in ("random", "surplus-top1") for k in range(3)]
    for r in rows:
        assert r["annotated"] == 20 * r["round"] and 0 < r["rsum"] <= 600
        assert r["r1_sum"] == pytest.approx(r["i2t_R@1"] + r["t2i_R@1"])
    round0 = [r for r in rows if r["round"] == 0]
    assert round0[0]["rsum"] == round0[1]["rsum"]   # one shared seed-set model per seed
    html = (out / "report.html").read_text()
    assert "curves.png" in html and "Why selected" in html and "Wall time per round" in html
    # the HTML tables hold the numbers of metrics.parquet, averaged here independently of the report code
    tables = {t[0][0:3] == ["strategy", "round", "annotated"] and "metrics" or t[0][-1]: t for t in html_tables(html)}
    by = collections.defaultdict(list)
    for r in rows:
        by[r["strategy"], r["round"]].append(r)
    body = tables["metrics"][1:]
    assert sorted((c[0], int(c[1])) for c in body) == sorted(by)
    for c in body:
        got = by[c[0], int(c[1])]
        assert c[3].split(" ± ")[0] == f"{np.mean([r['r1_sum'] for r in got]):.1f}", c
        assert c[4].split(" ± ")[0] == f"{np.mean([r['rsum'] for r in got]):.1f}", c
    diff = [c for c in tables["paired 95% CI"][1:]]
    assert sorted((c[0], int(c[1])) for c in diff) == [("surplus-top1", 1), ("surplus-top1", 2)]
    for c in diff:
        seeds = sorted({r["seed"] for r in rows})
        r1 = {(r["strategy"], r["seed"]): r["r1_sum"] for r in rows if r["round"] == int(c[1])}
        assert c[3] == f"{np.mean([r1['surplus-top1', s] - r1['random', s] for s in seeds]):+.1f}", c
    assert "Difference to random (paired by seed)" in html and "Selection diagnostics" in html
    assert "Annotations to reach random" in html and "against its control" not in html
    thumbs = list((out / "thumbs").glob("*.png"))
    assert thumbs and all(f"thumbs/{t.name}" in html for t in thumbs)
    state = json.loads((out / "surplus-top1" / "seed-0" / "round-2" / "state.json").read_text())
    assert len(state["selected"]) == 20 and not set(state["selected"]) & set(
        json.loads((out / "surplus-top1" / "seed-0" / "round-1" / "state.json").read_text())["selected"])
    assert set(state["timings"]) == {"embed_s", "score_s", "select_s", "diagnostics_s", "annotate_s", "train_s",
                                     "evaluate_s"}
    diag = state["diagnostics"]
    assert diag["selected"] == 20 and sum(diag["cluster_hist"]) == 20 and 1 <= diag["clusters_hit"] <= 20
    split = pq.read_table(root / "data" / "split.parquet").to_pydict()
    round1 = json.loads((out / "surplus-top1" / "seed-0" / "round-1" / "state.json").read_text())
    assert sum(diag["pool_cluster_hist"]) == split["split"].count("train") - round1["paired_images"]
    assert diag["anchors_beaten_per_item"] >= 0 and 0 <= diag["near_duplicates"] <= 1
    times = pq.read_table(out / "timings.parquet").to_pylist()
    assert len(times) == 6 and all(t["train_s"] > 0 and t["round_s"] >= t["train_s"] for t in times)
    assert "[5/5 rounds]" in run.stderr and "up to 3 at once" in run.stderr
    # issue 21 (13): quiet by default: no Ray Data progress lines, no token warning, no C++ log lines
    noise = [ln for ln in run.stderr.splitlines() if "logging_progress" in ln or "core_worker.cc" in ln
             or "Token authentication" in ln or "MapBatches" in ln]
    assert not noise, noise[:5]
    assert len(run.stderr.splitlines()) < 60, run.stderr[-3000:]


def test_concurrency_does_not_change_the_numbers(smoke):
    root, sets, _ = smoke
    one = loop(root / "one-at-a-time", sets + ["--set", "concurrency=1"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert "up to 1 at once" in one.stderr
    assert pq.read_table(root / "one-at-a-time" / "metrics.parquet").equals(pq.read_table(root / "out" / "metrics.parquet"))


@pytest.mark.full
def test_killed_concurrent_run_resumes_to_the_same_numbers(smoke):
    """SIGKILL of the whole process group (driver and its embedded Ray) after two rounds; the same
    command then runs only the missing rounds, in the driver this time (concurrency 0)."""
    root, sets, _ = smoke
    out = root / "killed"
    import faults

    cmd = loop_cmd(out, sets + ["--set", "concurrency=2"])
    script = faults.prelude("kill_after_rounds(2)") + "from hnal_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    killed = subprocess.run([sys.executable, "-c", script, *cmd[3:]], cwd=REPO, start_new_session=True,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    before = {f: f.stat().st_mtime_ns for f in out.glob("*/seed-*/round-*/state.json")}
    assert not (out / "report.html").exists() and len(before) < 5
    again = loop(out, sets + ["--set", "concurrency=0"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"5 rounds ({len(before)} already done)" in again.stderr
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())    # finished rounds were not redone
    assert pq.read_table(out / "metrics.parquet").equals(pq.read_table(root / "out" / "metrics.parquet"))


@pytest.mark.full
def test_a_changed_config_is_refused_but_concurrency_is_not_part_of_it(smoke):
    root, sets, _ = smoke
    again = loop(root / "out", sets + ["--set", "concurrency=1"])      # everything done: only the report
    assert again.returncode == 0 and "5 rounds (5 already done)" in again.stderr
    other = loop(root / "out", sets + ["--set", "budget=10"])
    assert other.returncode == 2 and "holds a run with a different config" in other.stderr


@pytest.mark.full
def test_a_resumed_loop_refuses_changed_data(smoke, tmp_path):
    """Issue 23 (1): the same command over data whose split changed stops with one line, before any
    round, instead of mixing the two splits' numbers."""
    import shutil

    import pyarrow as pa

    root, sets, _ = smoke
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    out = tmp_path / "out"
    mine = ["--set", f"data={data}", "--set", f"features={root}/features", "--set", "rounds=1", "--set", "seeds=[0]"]
    first = loop(out, mine)
    assert first.returncode == 0, first.stderr[-3000:]
    split = pq.read_table(data / "split.parquet")
    labels = split["split"].to_pylist()
    flip = [i for i, s in enumerate(labels) if s == "train"][:30]
    for i in flip:
        labels[i] = "test"
    pq.write_table(split.set_column(split.column_names.index("split"), "split", pa.array(labels)), data / "split.parquet")
    again = loop(out, mine)
    assert again.returncode == 2 and "the data changed" in again.stderr and "split.parquet" in again.stderr, \
        again.stderr[-2000:]


@pytest.mark.full
def test_one_loop_at_a_time_writes_an_out(smoke, tmp_path):
    """Issue 23 (6): a second loop on a held --out is refused at once with one line."""
    from hnal_ray.score.outdir import out_lock

    root, sets, _ = smoke
    with out_lock(tmp_path / "held"):
        other = loop(tmp_path / "held", sets)
    assert other.returncode == 2 and "another run" in other.stderr and "is writing this --out" in other.stderr


@pytest.mark.full
def test_an_empty_state_file_redoes_that_round(smoke, tmp_path):
    """Issue 23 (10): an empty state.json (a crash before its bytes reached the disk) makes the re-run
    redo that round, not raise on every re-run; the numbers are the same."""
    import shutil

    root, sets, _ = smoke
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    state = sorted(out.glob("*/seed-*/round-2/state.json"))[0]
    state.write_text("")
    again = loop(out, sets)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "5 rounds (4 already done)" in again.stderr and "empty or damaged" in again.stderr
    assert pq.read_table(out / "metrics.parquet").equals(pq.read_table(root / "out" / "metrics.parquet"))


@pytest.mark.full
def test_a_finished_run_is_extended_by_more_rounds(smoke, tmp_path):
    """Issue 21 (10): the same command with more rounds keeps the finished rounds and adds the new
    ones; fewer rounds or another change is still refused."""
    import shutil

    root, sets, _ = smoke
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = {f: f.stat().st_mtime_ns for f in out.glob("*/seed-*/round-*/state.json")}
    more = loop(out, sets + ["--set", "rounds=3"])
    assert more.returncode == 0, more.stderr[-3000:]
    assert "extending the run from 2 to 3 rounds" in more.stderr and "7 rounds (5 already done)" in more.stderr
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())
    rounds = pq.read_table(out / "metrics.parquet")["round"].to_pylist()
    assert max(rounds) == 3
    fewer = loop(out, sets + ["--set", "rounds=1"])
    assert fewer.returncode == 2 and "only `rounds` may grow" in fewer.stderr


@pytest.mark.full
def test_an_impossible_budget_is_refused_before_round_0(smoke, tmp_path):
    """Issue 23 (10): `budget: 10^12` is one line, exit 2, before any round trains."""
    root, sets, _ = smoke
    r = loop(tmp_path / "out", sets + ["--set", "budget=1000000000000"])
    assert r.returncode == 2 and "budget 1000000000000 is larger than the pool can be" in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "out").glob("*/seed-*/round-*/state.json"))


@pytest.mark.full
def test_sigterm_mid_loop_is_one_line_exit_143_and_resumes(smoke, tmp_path):
    """Issue 23 (10): SIGTERM to a loop whose rounds run as Ray tasks (a scheduler, `kill`, a
    container stop): the last line is ours, exit 143, no stack dump from Ray; the same command then
    finishes with the numbers of an undisturbed run."""
    import time

    root, sets, _ = smoke
    out = tmp_path / "out"
    proc = subprocess.Popen(loop_cmd(out, sets + ["--set", "concurrency=2"]), cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    end = time.time() + 300
    while time.time() < end and not list(out.glob("*/seed-*/round-0/state.json")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert proc.returncode == 143, err[-3000:]
    assert lines[-1] == "hnal loop: terminated (SIGTERM); re-run the same command to resume", err[-3000:]
    assert "Traceback" not in err and "core_worker" not in err and "*** " not in err, err[-3000:]
    again = loop(out, sets + ["--set", "concurrency=2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert pq.read_table(out / "metrics.parquet").equals(pq.read_table(root / "out" / "metrics.parquet"))
