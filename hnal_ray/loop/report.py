"""The run report: learning curves (PNG), report.md and report.html rendered from one set of tables
by the templates in `templates/`, and a "why selected" section read from a round's score outputs."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.data.contract import image_column
from hnal_ray.data.images import ImageError, thumbnail_png
from hnal_ray.io import read_embeddings, write_parquet
from hnal_ray.loop import stats
from hnal_ray.loop.config import LoopConfig
from hnal_ray.loop.templates import TEMPLATES


def table(title: str, header: list[str], rows: list[list], intro: str = "") -> dict:
    """One table as both templates draw it: a title, an optional sentence, a header and rows of cells."""
    return {"title": title, "intro": intro, "header": header, "rows": [[str(c) for c in r] for r in rows]}


def write_report(cfg: LoopConfig, out: Path, rows: list[dict], timings: list[dict],
                 states: list[dict] = ()) -> Path:
    """DIR/report.md and DIR/report.html (+ curves.png, metrics.parquet, timings.parquet, thumbs/)."""
    write_parquet(pa.Table.from_pylist(rows), out / "metrics.parquet")
    write_parquet(pa.Table.from_pylist(timings), out / "timings.parquet")
    summary = stats.summarize(rows)
    plot_curves(summary, out / "curves.png")
    page = {"title": "Active-learning report",
            "intro": f"Budget {cfg.budget} per round, {cfg.rounds} rounds, seed set {cfg.seed_size} images, "
                     f"seeds {list(cfg.seeds)}; metrics on the test split.",
            "notes": _run_notes(cfg, out, list(states)), "tables": _tables(cfg, rows, summary, timings, list(states)),
            "why": _why_selected(cfg, out, list(states))}
    (out / "report.md").write_text(TEMPLATES.get_template("report.md.j2").render(page))
    (out / "report.html").write_text(TEMPLATES.get_template("report.html.j2").render(page))
    return out / "report.html"


def _tables(cfg: LoopConfig, rows: list[dict], summary: list[dict], timings: list[dict],
            states: list[dict]) -> list[dict]:
    """Metrics per round; then, where they apply, the difference to random, annotations to reach
    random, hardness against its control, selection diagnostics; then wall time per stage."""
    one_seed = len(cfg.seeds) == 1

    def spread(mean: float, std: float) -> str:  # one seed has no spread to show
        return f"{mean:.1f}" if one_seed else f"{mean:.1f} ± {std:.1f}"

    def ci(d: dict) -> list:  # one seed has no interval
        return [f"{d['diff']:+.1f}", f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]" if d["seeds"] > 1 else "-"]

    by_round = sorted(summary, key=lambda r: (r["round"], r["strategy"]))
    out = [table("Metrics per round" + (" (one seed)" if one_seed else " (mean ± std over seeds)"),
                 ["strategy", "round", "annotated", "R@1-sum", "rsum"],
                 [[r["strategy"], r["round"], f"{r['annotated']:.0f}", spread(r["r1_sum"], r["r1_sum_std"]),
                   spread(r["rsum"], r["rsum_std"])] for r in by_round])]
    diffs = stats.paired_differences(rows) if any(r["strategy"] == "random" for r in rows) else []
    if diffs:
        out.append(table("Difference to random (paired by seed)",
                         ["strategy", "round", "seeds", "R@1-sum minus random", "paired 95% CI"],
                         [[d["strategy"], d["round"], d["seeds"], *ci(d)]
                          for d in sorted(diffs, key=lambda d: (d["round"], d["strategy"]))]))
    reach = stats.annotations_to_reach(summary)
    if reach:
        out.append(table("Annotations to reach random's final R@1-sum",
                         ["strategy", "annotations to reach it", "share of random's"],
                         [[r["strategy"], *(["not reached", "-"] if r["annotated"] is None else
                                            [f"{r['annotated']:.0f}", f"{r['fraction']:.2f}"])] for r in reach],
                         f"The first round whose mean R@1-sum reaches random's mean at its last round "
                         f"({reach[0]['target']:.1f} after {reach[0]['baseline_annotated']:.0f} annotations); "
                         f"measured rounds only."))
    controls = stats.control_differences(rows, stats.control_pairs(list(cfg.strategies)))
    if controls:
        out.append(table("Hardness against its control (paired by seed)",
                         ["strategy", "control", "round", "seeds", "R@1-sum minus control", "paired 95% CI"],
                         [[d["strategy"], d["control"], d["round"], d["seeds"], *ci(d)]
                          for d in sorted(controls, key=lambda d: (d["round"], d["strategy"]))],
                         "A clustered strategy's hardest item per cluster against the same clusters and quotas with "
                         "a random item per cluster: hardness is credited only where this is above 0."))
    diag = stats.diagnostics_summary(states)
    keys = [k for k in stats.DIAGNOSTICS if diag and all(k in d for d in diag)
            and not (k.startswith("groups_hit") and all(d[k] <= 1 for d in diag))]  # data without groups
    if diag:
        out.append(table("Selection diagnostics (mean over seeds and rounds)", ["strategy", *keys],
                         [[d["strategy"], *(f"{d[k]:.3g}" for k in keys)] for d in diag],
                         "redundancy: mean pairwise cosine of the picks (model embeddings), vs a random batch of the "
                         "same size; anchors beaten: paired texts (images) each pick beats under Top-1 thresholds; "
                         "covered: beaten by any pick; clusters: k-means clusters of the frozen features hit (of 20), "
                         "vs a random batch; near duplicates: share of picks with frozen cosine >= 0.95 to a paired "
                         "item; groups: data-set groups hit."))
    out.append(table("Wall time per round (seconds, mean)", ["rounds", "n", *(k[:-2] for k in stats.TIME_COLUMNS)],
                     [[t["rounds"], t["n"], *(f"{t[k]:.1f}" for k in stats.TIME_COLUMNS)]
                      for t in stats.stage_times(timings)]))
    return out


def plot_curves(summary: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, label in ((axes[0], "r1_sum", "R@1-sum (test)"), (axes[1], "rsum", "rsum (test)")):
        for strategy in dict.fromkeys(r["strategy"] for r in summary):
            pts = sorted((r for r in summary if r["strategy"] == strategy), key=lambda r: r["round"])
            x = np.array([p["annotated"] for p in pts])
            y, sd = np.array([p[metric] for p in pts]), np.array([p[f"{metric}_std"] for p in pts])
            ax.plot(x, y, marker="o", label=strategy)
            ax.fill_between(x, y - sd, y + sd, alpha=0.15)
        ax.set_xlabel("annotated pool items")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mean and spread (1 std) over {summary[0]['seeds']} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_notes(cfg: LoopConfig, out: Path, states: list[dict]) -> list[dict]:
    """What a reader must know before the tables: how finely the test split can resolve a
    difference, the captions people wrote (round, file, count, when), and where the final models are."""
    notes = []
    split = Path(cfg.data) / "split.parquet"
    if split.exists():
        n_test = sum(1 for s in pq.read_table(split, columns=["split"])["split"].to_pylist() if s == "test")
        if 0 < n_test < 300:
            notes.append({"label": "Resolution", "text": (
                f"the test split holds {n_test} images: one image retrieved or not moves an R@1 by "
                f"{100 / n_test:.1f} points (R@1-sum: two of them), so differences of a few points are within "
                f"what this split can tell apart.")})
    imported = sorted(out.glob("*/seed-*/round-*/annotations.json"))
    if imported:
        rows = []
        for f in imported:
            info = json.loads(f.read_text())
            when = datetime.fromtimestamp(f.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
            rows.append([f.parent.relative_to(out), info.get("captions"), info.get("images"), info.get("file"), when])
        notes.append({"table": table("Captions people wrote", ["round", "captions", "images", "file", "imported (UTC)"],
                                     rows)})
    last = [s for s in states if s.get("round") == cfg.rounds and s.get("checkpoint")]
    if last:
        notes.append({"text": "Final models (last round): " + (
            ", ".join(f"{s.get('strategy')} seed {s.get('seed')}: {s['checkpoint']}" for s in last) if len(last) <= 4
            else f"STRATEGY/seed-S/round-{cfg.rounds}/checkpoint in {out}")})
    return notes


def explain(state: dict, state_dir: Path, captions: dict[int, str], top: int = 8, per_item: int = 5) -> list[dict]:
    """For the round's first `top` picks (its state's `selected`, whatever ranked them): the paired texts
    each beats (s(u, t) > xi_t) and by how much, with the thresholds its score job computed
    (`score/thresholds.parquet`) and the embeddings it read."""
    emb = state_dir / "embeddings"
    texts = read_embeddings(emb / "paired" / "captions.parquet", "text_id", "image_id")
    pool = read_embeddings(emb / "pool" / "images.parquet", "image_id")
    xi = pq.read_table(state_dir / "score" / "thresholds.parquet")
    threshold = dict(zip(xi["text_id"].to_pylist(), xi["threshold"].to_numpy()))
    t_xi = np.array([threshold[int(i)] for i in texts.ids])
    scored = pq.read_table(state_dir / "score" / "scores.parquet", columns=["image_id", "score"]).to_pydict()
    score = dict(zip(scored["image_id"], scored["score"]))
    out = []
    for image_id in state["selected"][:top]:
        u = pool.emb[np.flatnonzero(pool.ids == image_id)[0]]
        margin = texts.emb.astype(np.float64) @ u.astype(np.float64) - t_xi
        beats = np.argsort(-margin, kind="stable")[:per_item]
        out.append({"image_id": int(image_id), "score": float(score[image_id]), "texts_beaten": int((margin > 0).sum()),
                    "beats": [{"text": captions[int(texts.ids[j])], "margin": float(margin[j])}
                              for j in beats if margin[j] > 0]})
    return out


def _why_selected(cfg: LoopConfig, out: Path, states: list[dict]) -> dict | None:
    """The first image-side strategy whose last round (first seed) scored against thresholds:
    its top picks, the texts each beats and by how much."""
    last = {(s.get("strategy"), s.get("seed")): s for s in states if s.get("round") == cfg.rounds}
    for strategy in (s for s in cfg.strategies if s.side == "image"):
        state = last.get((strategy.name, cfg.seeds[0]))
        state_dir = out / strategy.name / f"seed-{cfg.seeds[0]}" / f"round-{cfg.rounds}"
        if state and (state_dir / "score" / "thresholds.parquet").exists():
            break
    else:
        return None
    tables = [pq.read_table(Path(cfg.data) / "captions.parquet", columns=["text_id", "text", "image_id"])]
    tables += [pq.read_table(f, columns=["text_id", "text", "image_id"])  # captions people wrote in this run
               for f in sorted(out.glob(f"{strategy.name}/seed-{cfg.seeds[0]}/round-*/annotations.parquet"))]
    caps = pa.concat_tables(tables).to_pydict()
    captions = dict(zip(caps["text_id"], caps["text"]))
    own = {}
    for t, i in zip(caps["text"], caps["image_id"]):
        own.setdefault(i, []).append(t)
    items = explain(state, state_dir, captions)
    _write_thumbs(cfg, out, [it["image_id"] for it in items])
    return {"intro": f"Strategy `{strategy.name}`, seed {cfg.seeds[0]}, round {cfg.rounds}: the top selected "
                     f"images, the paired texts each beats (s(u,t) - xi_t > 0) and by how much.",
            "items": [it | {"name": " / ".join(own.get(it["image_id"], [])),
                            "beats": "; ".join(f"{b['text']} (+{b['margin']:.3f})" for b in it["beats"]) or "none"}
                      for it in items]}


def _write_thumbs(cfg: LoopConfig, out: Path, image_ids: list[int]) -> None:
    column = image_column(pq.read_schema(Path(cfg.data) / "images.parquet"))
    if not column or not image_ids:
        return
    images = pq.read_table(Path(cfg.data) / "images.parquet", columns=["image_id", column],
                           filters=[("image_id", "in", image_ids)]).to_pydict()
    (out / "thumbs").mkdir(exist_ok=True)
    for image_id, encoded in zip(images["image_id"], images[column]):
        try:
            (out / "thumbs" / f"{image_id}.png").write_bytes(thumbnail_png(encoded, 96))
        except ImageError:
            pass
