"""The run report: learning curves (PNG), a table per round, and a "why selected" page."""
from __future__ import annotations

import dataclasses
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.data.contract import image_column
from hnal_ray.data.images import ImageError, thumbnail_png
from hnal_ray.io import read_embeddings, write_parquet
from hnal_ray.loop.config import LoopConfig, StrategyConfig
from hnal_ray.score.thresholds import kth, minibatch_thresholds, negative_topk


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)


def paired_differences(rows: list[dict], baseline: str = "random", metric: str = "r1_sum",
                       first_round: int = 1) -> list[dict]:
    """Per (strategy, round >= 1): the mean over seeds of (strategy - baseline) and its paired 95%
    confidence interval (t over the seeds both ran; every strategy of a seed starts from the same
    seed set, so the pairing removes the seed set's luck)."""
    base = {(r["seed"], r["round"]): r[metric] for r in rows if r["strategy"] == baseline}
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        if strategy == baseline:
            continue
        for rnd in sorted({r["round"] for r in rows if r["strategy"] == strategy and r["round"] >= first_round}):
            d = np.array([r[metric] - base[(r["seed"], rnd)] for r in rows if r["strategy"] == strategy
                          and r["round"] == rnd and (r["seed"], rnd) in base])
            if len(d) == 0:
                continue
            half = (T95[len(d) - 2] if len(d) - 1 <= len(T95) else 1.96) * d.std(ddof=1) / np.sqrt(len(d)) \
                if len(d) > 1 else float("nan")
            out.append({"strategy": strategy, "round": rnd, "seeds": len(d), "diff": float(d.mean()),
                        "ci_low": float(d.mean() - half), "ci_high": float(d.mean() + half)})
    return out


def compare_runs(a: list[dict], b: list[dict], metric: str = "r1_sum") -> list[dict]:
    """Run B minus run A (rows of two runs' metrics.parquet), per strategy both ran and per round
    (0 included: the seed model), paired by seed, with the 95% confidence interval: e.g. the same
    strategies and seeds with another training config."""
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in a):
        rows = ([r | {"strategy": "a"} for r in a if r["strategy"] == strategy]
                + [r | {"strategy": "b"} for r in b if r["strategy"] == strategy])
        out += [d | {"strategy": strategy} for d in paired_differences(rows, "a", metric, first_round=0)]
    return out


def control_pairs(strategies: list[StrategyConfig]) -> list[tuple[str, str]]:
    """(hardest, control) for each clustered strategy that takes the hardest item of a cluster and
    has, in the same run, a control that differs only in taking a random item (same clusters,
    quotas, weight and k): hardness is credited only if it beats that control."""
    def key(s: StrategyConfig) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in dataclasses.asdict(s).items() if k not in ("name", "within")))
    controls = {key(s): s.name for s in strategies if s.strategy == "cluster" and s.within == "random"}
    return [(s.name, controls[key(s)]) for s in strategies
            if s.strategy == "cluster" and s.within == "hardest" and s.switch_at is None and key(s) in controls]


def control_differences(rows: list[dict], pairs: list[tuple[str, str]], metric: str = "r1_sum") -> list[dict]:
    """Per (hardest, control) pair and round >= 1: hardest minus control, paired by seed, 95% CI."""
    out = []
    for hardest, control in pairs:
        sub = ([r | {"strategy": "h"} for r in rows if r["strategy"] == hardest]
               + [r | {"strategy": "c"} for r in rows if r["strategy"] == control])
        out += [d | {"strategy": hardest, "control": control} for d in paired_differences(sub, "c", metric)]
    return out


def diagnostics_summary(states: list[dict]) -> list[dict]:
    """Mean of each scalar selection diagnostic per strategy over seeds and rounds >= 1."""
    keys = ("redundancy", "redundancy_random", "anchors_beaten_per_item", "anchors_covered", "clusters_hit",
            "clusters_hit_random", "cluster_max_share", "near_duplicates", "groups_hit", "groups_hit_random")
    out = []
    for strategy in dict.fromkeys(s["strategy"] for s in states):
        diags = [s["diagnostics"] for s in states if s["strategy"] == strategy and s.get("diagnostics")]
        if diags:
            out.append({"strategy": strategy, "rounds": len(diags),
                        **{k: float(np.mean([d[k] for d in diags])) for k in keys if all(k in d for d in diags)}})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (strategy, round)."""
    out = []
    keys = sorted({(r["strategy"], r["round"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for strategy, rnd in keys:
        group = [r for r in rows if r["strategy"] == strategy and r["round"] == rnd]
        row = {"strategy": strategy, "round": rnd, "seeds": len(group),
               "annotated": float(np.mean([g["annotated"] for g in group]))}
        for m in ("r1_sum", "rsum", "i2t_R@1", "t2i_R@1"):
            vals = np.array([g[m] for g in group])
            row[m], row[f"{m}_std"] = float(vals.mean()), float(vals.std())
        out.append(row)
    return out


def annotations_to_reach(summary: list[dict], baseline: str = "random", metric: str = "r1_sum") -> list[dict]:
    """Per strategy: the annotations of the first measured round whose mean `metric` (over seeds)
    reaches the baseline's mean at its last round, or None; `fraction` of the baseline's
    annotations at that last round. Measured rounds only, no interpolation."""
    base = [r for r in summary if r["strategy"] == baseline]
    if not base:
        return []
    last = max(base, key=lambda r: r["round"])
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in summary):
        hit = [r for r in sorted((r for r in summary if r["strategy"] == strategy), key=lambda r: r["round"])
               if r[metric] >= last[metric]]
        at = hit[0]["annotated"] if hit else None
        out.append({"strategy": strategy, "target": last[metric], "baseline_annotated": last["annotated"],
                    "annotated": at, "fraction": None if at is None or not last["annotated"] else at / last["annotated"]})
    return out


# the stages of a round, in order: the keys of state["timings"] and of timings.parquet
STAGES = ("embed_s", "score_s", "select_s", "diagnostics_s", "annotate_s", "train_s", "evaluate_s")
TIME_COLUMNS = STAGES + ("round_s",)


def stage_times(rows: list[dict]) -> list[dict]:
    """Mean wall seconds per round of each stage: the seed-set rounds, then each strategy's rounds >= 1."""
    groups = {"seed set (round 0)": [r for r in rows if r["round"] == 0 and r["strategy"] == rows[0]["strategy"]]}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        groups[strategy] = [r for r in rows if r["strategy"] == strategy and r["round"] > 0]
    return [{"rounds": name, "n": len(g), **{k: float(np.mean([r.get(k, 0.0) for r in g])) for k in TIME_COLUMNS}}
            for name, g in groups.items() if g]


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


def explain(state_dir: Path, strategy: StrategyConfig, captions: dict[int, str], top: int = 8,
            per_item: int = 5) -> list[dict]:
    """For the first `top` selected images of a round: the paired texts each beats (s > xi) and by how much."""
    emb = state_dir / "embeddings"
    images = read_embeddings(emb / "paired" / "images.parquet", "image_id")
    texts = read_embeddings(emb / "paired" / "captions.parquet", "text_id", "image_id")
    pool = read_embeddings(emb / "pool" / "images.parquet", "image_id")
    oi, ot = np.argsort(images.ids), np.argsort(texts.ids)
    img_ids, img_emb = images.ids[oi], images.emb[oi]
    txt_ids, owner, txt_emb = texts.ids[ot], texts.owner[ot], texts.emb[ot]
    if strategy.threshold_batch:
        xi = minibatch_thresholds(txt_emb, owner, img_emb, img_ids, strategy.k, strategy.threshold_batch,
                                  json.loads((state_dir / "score" / "summary.json").read_text())["seed"], "image")
    else:
        xi = kth(negative_topk(txt_emb, owner, img_emb, img_ids, strategy.k), strategy.k)
    sel = pq.read_table(state_dir / "score" / "selection.parquet").to_pydict()
    out = []
    for image_id, score in list(zip(sel["image_id"], sel["score"]))[:top]:
        u = pool.emb[np.flatnonzero(pool.ids == image_id)[0]]
        margin = txt_emb @ u - xi
        beats = np.argsort(-margin)[:per_item]
        out.append({"image_id": int(image_id), "score": float(score), "texts_beaten": int((margin > 0).sum()),
                    "beats": [{"text": captions[int(txt_ids[j])], "margin": float(margin[j])}
                              for j in beats if margin[j] > 0]})
    return out


REACH_TITLE = "## Annotations to reach random's final R@1-sum"
CONTROL_TITLE = "## Hardness against its control (paired by seed)"


def write_report(cfg: LoopConfig, out: Path, rows: list[dict], timings: list[dict],
                 states: list[dict] = ()) -> Path:
    """DIR/report.md and DIR/report.html (+ curves.png, metrics.parquet, timings.parquet, thumbs/)."""
    write_parquet(pa.Table.from_pylist(rows), out / "metrics.parquet")
    write_parquet(pa.Table.from_pylist(timings), out / "timings.parquet")
    summary = summarize(rows)
    plot_curves(summary, out / "curves.png")
    one_seed = len(cfg.seeds) == 1

    def spread(mean: float, std: float) -> str:  # one seed has no spread to show
        return f"{mean:.1f}" if one_seed else f"{mean:.1f} ± {std:.1f}"

    table = ["| strategy | round | annotated | R@1-sum | rsum |", "|---|---|---|---|---|"]
    table += [f"| {r['strategy']} | {r['round']} | {r['annotated']:.0f} | {spread(r['r1_sum'], r['r1_sum_std'])}"
              f" | {spread(r['rsum'], r['rsum_std'])} |" for r in sorted(summary, key=lambda r: (r["round"],
                                                                                                 r["strategy"]))]
    metrics_title = "Metrics per round" + (" (one seed)" if one_seed else " (mean ± std over seeds)")
    notes = _run_notes(cfg, out, list(states))
    why = _why_selected(cfg, out)
    diffs = paired_differences(rows) if any(r["strategy"] == "random" for r in rows) else []
    dtable = ["| strategy | round | seeds | R@1-sum minus random | paired 95% CI |", "|---|---|---|---|---|"]
    dtable += [f"| {d['strategy']} | {d['round']} | {d['seeds']} | {d['diff']:+.1f} | [{d['ci_low']:+.1f}, "
               f"{d['ci_high']:+.1f}] |" for d in sorted(diffs, key=lambda d: (d["round"], d["strategy"]))]
    reach = annotations_to_reach(summary)
    rtable = ["| strategy | annotations to reach it | share of random's |", "|---|---|---|"]
    rtable += [f"| {r['strategy']} | " + ("not reached | - |" if r["annotated"] is None else
                                          f"{r['annotated']:.0f} | {r['fraction']:.2f} |") for r in reach]
    controls = control_differences(rows, control_pairs(list(cfg.strategies)))
    ctable = ["| strategy | control | round | seeds | R@1-sum minus control | paired 95% CI |", "|---|---|---|---|---|---|"]
    ctable += [f"| {d['strategy']} | {d['control']} | {d['round']} | {d['seeds']} | {d['diff']:+.1f} | "
               f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] |" for d in sorted(controls, key=lambda d: (d["round"],
                                                                                                     d["strategy"]))]
    diag = diagnostics_summary(list(states))
    dkeys = [k for k in ("redundancy", "redundancy_random", "anchors_beaten_per_item", "anchors_covered",
                         "clusters_hit", "clusters_hit_random", "cluster_max_share", "near_duplicates", "groups_hit",
                         "groups_hit_random") if diag and all(k in d for d in diag)
             and not (k.startswith("groups_hit") and all(d[k] <= 1 for d in diag))]  # data without groups
    gtable = ["| strategy | " + " | ".join(dkeys) + " |", "|---" * (len(dkeys) + 1) + "|"]
    gtable += ["| " + " | ".join([d["strategy"]] + [f"{d[k]:.3g}" for k in dkeys]) + " |" for d in diag]
    extra_md = (["## Difference to random (paired by seed)", "", *dtable, ""] if diffs else []) + (
        [REACH_TITLE, "", f"The first round whose mean R@1-sum reaches random's mean at its last round "
         f"({reach[0]['target']:.1f} after {reach[0]['baseline_annotated']:.0f} annotations); measured rounds only.",
         "", *rtable, ""] if reach else []) + (
        [CONTROL_TITLE, "", "A clustered strategy's hardest item per cluster against the same clusters and quotas "
         "with a random item per cluster: hardness is credited only where this is above 0.", "", *ctable, ""]
        if controls else []) + (
        ["## Selection diagnostics (mean over seeds and rounds)", "",
         "redundancy: mean pairwise cosine of the picks (model embeddings), vs a random batch of the same size; "
         "anchors beaten: paired texts (images) each pick beats under Top-1 thresholds; covered: beaten by any "
         "pick; clusters: k-means clusters of the frozen features hit (of 20), vs a random batch; near duplicates: "
         "share of picks with frozen cosine >= 0.95 to a paired item; groups: data-set groups hit.", "",
         *gtable, ""] if diag else [])
    extra_html = "".join(
        f"<h2>{html.escape(title)}</h2><table>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
            for line in tab if not line.startswith("|---")) + "</table>"
        for title, tab in (("Difference to random (paired by seed)", dtable if diffs else []),
                           (REACH_TITLE[3:], rtable if reach else []),
                           (CONTROL_TITLE[3:], ctable if controls else []),
                           ("Selection diagnostics (mean over seeds and rounds)", gtable if diag else [])) if tab)
    times = stage_times(timings)
    head = "| rounds | n | " + " | ".join(k[:-2] for k in TIME_COLUMNS) + " |"
    ttable = [head, "|---" * (len(TIME_COLUMNS) + 2) + "|"]
    ttable += ["| " + " | ".join([t["rounds"], str(t["n"])] + [f"{t[k]:.1f}" for k in TIME_COLUMNS]) + " |" for t in times]
    thtml = ("<h2>Wall time per round (seconds, mean)</h2><table><tr><th>rounds</th><th>n</th>"
             + "".join(f"<th>{k[:-2]}</th>" for k in TIME_COLUMNS) + "</tr>"
             + "".join(f"<tr><td>{html.escape(t['rounds'])}</td><td>{t['n']}</td>"
                       + "".join(f"<td>{t[k]:.1f}</td>" for k in TIME_COLUMNS) + "</tr>" for t in times) + "</table>")
    md = ["# Active-learning report", "", f"Budget {cfg.budget} per round, {cfg.rounds} rounds, seed set "
          f"{cfg.seed_size} images, seeds {list(cfg.seeds)}; metrics on the test split.", "",
          *notes["md"], "![learning curves](curves.png)", "", f"## {metrics_title}", "", *table, "",
          *extra_md, "## Wall time per round (seconds, mean)", "", *ttable, ""]
    md += ["## Why selected", "", why["md"]] if why else []
    (out / "report.md").write_text("\n".join(md) + "\n")
    rows_html = "".join(f"<tr><td>{html.escape(r['strategy'])}</td><td>{r['round']}</td><td>{r['annotated']:.0f}</td>"
                        f"<td>{spread(r['r1_sum'], r['r1_sum_std'])}</td><td>{spread(r['rsum'], r['rsum_std'])}"
                        f"</td></tr>" for r in sorted(summary, key=lambda r: (r["round"], r["strategy"])))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>hnal_ray report</title><style>"
            f"body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 8px;border-bottom:1px"
            f" solid #ddd}}.item{{display:flex;gap:12px;margin:10px 0}}</style></head><body>"
            f"<h1>Active-learning report</h1><p>Budget {cfg.budget} per round, {cfg.rounds} rounds, seed set "
            f"{cfg.seed_size} images, seeds {list(cfg.seeds)}; metrics on the test split.</p>"
            f"{notes['html']}<img src='curves.png' width='100%'><h2>{metrics_title}</h2><table>"
            f"<tr><th>strategy</th><th>round</th><th>annotated</th><th>R@1-sum</th><th>rsum</th></tr>{rows_html}"
            f"</table>{extra_html}{thtml}{why['html'] if why else ''}</body></html>")
    (out / "report.html").write_text(page)
    return out / "report.html"


def _run_notes(cfg: LoopConfig, out: Path, states: list[dict]) -> dict:
    """What a reader must know before the tables: how finely the test split can resolve a
    difference, the captions people wrote (round, file, count, when), and where the final models are."""
    md, parts = [], []
    split = Path(cfg.data) / "split.parquet"
    if split.exists():
        n_test = sum(1 for s in pq.read_table(split, columns=["split"])["split"].to_pylist() if s == "test")
        if 0 < n_test < 300:
            line = (f"**Resolution:** the test split holds {n_test} images: one image retrieved or not moves an "
                    f"R@1 by {100 / n_test:.1f} points (R@1-sum: two of them), so differences of a few points "
                    f"are within what this split can tell apart.")
            md += [line, ""]
            parts.append(f"<p>{html.escape(line.replace('**', ''))}</p>")
    imported = sorted(out.glob("*/seed-*/round-*/annotations.json"))
    if imported:
        rows = ["| round | captions | images | file | imported (UTC) |", "|---|---|---|---|---|"]
        for f in imported:
            info = json.loads(f.read_text())
            when = datetime.fromtimestamp(f.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
            rows.append(f"| {f.parent.relative_to(out)} | {info.get('captions')} | {info.get('images')} | "
                        f"{info.get('file')} | {when} |")
        md += ["## Captions people wrote", "", *rows, ""]
        parts.append("<h2>Captions people wrote</h2><table>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r.strip("|").split("|")) + "</tr>"
            for r in rows if not r.startswith("|---")) + "</table>")
    last = [s for s in states if s.get("round") == cfg.rounds and s.get("checkpoint")]
    if last:
        line = ("Final models (last round): " + ", ".join(f"{s.get('strategy')} seed {s.get('seed')}: {s['checkpoint']}"
                                                          for s in last) if len(last) <= 4 else
                f"Final models (last round): STRATEGY/seed-S/round-{cfg.rounds}/checkpoint in {out}")
        md += [line, ""]
        parts.append(f"<p>{html.escape(line)}</p>")
    return {"md": md, "html": "".join(parts)}


def _why_selected(cfg: LoopConfig, out: Path) -> dict | None:
    """The first image-side hard-negative strategy, first seed, last round."""
    strategy = next((s for s in cfg.strategies if s.strategy == "hard-negative" and s.side == "image"), None)
    if strategy is None or cfg.rounds < 1:
        return None
    state_dir = out / strategy.name / f"seed-{cfg.seeds[0]}" / f"round-{cfg.rounds}"
    tables = [pq.read_table(Path(cfg.data) / "captions.parquet", columns=["text_id", "text", "image_id"])]
    tables += [pq.read_table(f, columns=["text_id", "text", "image_id"])  # captions people wrote in this run
               for f in sorted(out.glob(f"{strategy.name}/seed-{cfg.seeds[0]}/round-*/annotations.parquet"))]
    caps = pa.concat_tables(tables).to_pydict()
    captions = dict(zip(caps["text_id"], caps["text"]))
    own = {}
    for t, i in zip(caps["text"], caps["image_id"]):
        own.setdefault(i, []).append(t)
    items = explain(state_dir, strategy, captions)
    column = image_column(pq.read_schema(Path(cfg.data) / "images.parquet"))
    wanted = [it["image_id"] for it in items]
    images = (pq.read_table(Path(cfg.data) / "images.parquet", columns=["image_id", column],
                            filters=[("image_id", "in", wanted)]).to_pydict() if column and wanted else {})
    encoded = dict(zip(images.get("image_id", []), images.get(column, [])))
    (out / "thumbs").mkdir(exist_ok=True)
    md, hs = [f"Strategy `{strategy.name}`, seed {cfg.seeds[0]}, round {cfg.rounds}: the top selected images, "
              f"the paired texts each beats (s(u,t) - xi_t > 0) and by how much.", ""], []
    for it in items:
        if it["image_id"] in encoded:
            try:
                (out / "thumbs" / f"{it['image_id']}.png").write_bytes(thumbnail_png(encoded[it["image_id"]], 96))
            except ImageError:
                pass
        beats = "; ".join(f"{b['text']} (+{b['margin']:.3f})" for b in it["beats"]) or "none"
        name = " / ".join(own.get(it["image_id"], []))
        md.append(f"- ![](thumbs/{it['image_id']}.png) **{name}** score {it['score']:.3f}, beats "
                  f"{it['texts_beaten']} texts: {beats}")
        hs.append(f"<div class='item'><img src='thumbs/{it['image_id']}.png' style='max-width:72px;max-height:72px'><div>"
                  f"<b>{html.escape(name)}</b> score {it['score']:.3f}, beats {it['texts_beaten']} paired texts"
                  f"<br>{html.escape(beats)}</div></div>")
    return {"md": "\n".join(md), "html": f"<h2>Why selected</h2><p>{html.escape(md[0])}</p>{''.join(hs)}"}
