"""The main job end to end: jobs/smoke.yaml on a local Ray (a subprocess, as a user runs it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def loop(out, sets, env=None):
    return subprocess.run([sys.executable, "-m", "hnal_ray.cli", "loop", "jobs/smoke.yaml", "--out", str(out), *sets],
                          cwd=REPO, env=env or os.environ.copy(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    sets = ["--set", f"data={root}/data", "--set", f"features={root}/features"]
    r = loop(root / "out", sets)
    assert r.returncode == 0, r.stderr[-4000:]
    return root, sets, r


def test_smoke_run_writes_the_report(smoke):
    root, _, r = smoke
    out = root / "out"
    assert f"report: {out / 'report.html'}" in r.stdout
    for name in ("report.html", "report.md", "curves.png", "metrics.parquet"):
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
    assert "curves.png" in html and "Why selected" in html and html.count("<tr>") == 7
    thumbs = list((out / "thumbs").glob("*.png"))
    assert thumbs and all(f"thumbs/{t.name}" in html for t in thumbs)
    state = json.loads((out / "surplus-top1" / "seed-0" / "round-2" / "state.json").read_text())
    assert len(state["selected"]) == 20 and not set(state["selected"]) & set(
        json.loads((out / "surplus-top1" / "seed-0" / "round-1" / "state.json").read_text())["selected"])


def test_killed_after_round_1_resumes_to_the_same_numbers(smoke):
    root, sets, _ = smoke
    out = root / "resumed"
    only_random = sets + ["--set", "strategies=[{name: random, strategy: random}]"]
    killed = loop(out, only_random, dict(os.environ, HNAL_STOP_AFTER_ROUNDS="2"))
    assert killed.returncode == 3, killed.stderr[-3000:]
    assert (out / "random" / "seed-0" / "round-1" / "state.json").exists()
    assert not (out / "random" / "seed-0" / "round-2").exists() and not (out / "report.html").exists()
    again = loop(out, only_random)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[3/3 rounds] random seed 0 round 2" in again.stderr       # only the missing round ran
    assert "round 0: test" not in again.stderr and "round 1: test" not in again.stderr
    want = [r for r in pq.read_table(root / "out" / "metrics.parquet").to_pylist() if r["strategy"] == "random"]
    got = pq.read_table(out / "metrics.parquet").to_pylist()
    assert got == want
