"""The printed table of `hnal bench score`: one line per path and pool size, then Ray rows and ratios."""
from __future__ import annotations


def format_table(res: dict) -> str:
    """The printed table: one line per path and pool size, then the Ray rows and the headline ratios."""
    cfg, m = res["config"], res["machine"]
    lines = [f"hnal bench score: texts {cfg['texts']} x d {cfg['dim']}, {cfg['weight']}, k={cfg['k']}, spread "
             f"{cfg['spread']}, seed {cfg['seed']} | {m['gpu'] or m['cpu']}, {m['cores']} cores, load "
             f"{m['load_before']:.2f} -> {m['load_after']:.2f} | thresholds {res['data']['thresholds_s']:.2f}s",
             f"{'path':<22}{'pool':>8}{'sec':>8}{'Mpair/s':>9}{'GFLOP/s':>9}{'xGEMM':>7}{'peakMiB':>9}"
             f"{'max|ds|':>9}{'topB':>7}  notes"]
    for r in res["rows"] + [r | {"path": f"ray x{r['actors']}"} for r in res["ray"]]:
        label = r["path"] + "".join(f" {c}{r[k]}" for k, c in (("nprobe", "p"), ("top_m", "m"), ("precision", ""))
                                    if k in r)
        notes = ", ".join(f"{k} {r[k]:.3g}" for k in ("skipped", "kmeans_s", "build_s", "speedup", "efficiency",
                                                      "gpu_peak_mib", "band_share") if k in r and r["path"] != "score_pool")
        pairs = r["pool"] * cfg["texts"]
        lines.append(f"{label:<22}{r['pool']:>8}{r['seconds']:>8.2f}{pairs / r['seconds'] / 1e6:>9.0f}"
                     f"{2e-9 * pairs * cfg['dim'] / r['seconds']:>9.1f}"
                     f"{_fmt(r.get('ratio_to_gemm'), '7.2f')}{r['peak_mib']:>9.0f}"
                     f"{_fmt(r.get('max_abs_err'), '9.1e')}{_fmt(r.get('selection_overlap'), '7.3f')}  {notes}")
    lines.append("  ".join(f"{k} {res[k]:.3g}" for k in ("ratio_to_gemm", "dense_fused_ratio_to_gemm",
                                                         "pruned_ratio_to_gemm", "pairs_skipped",
                                                         "oracle_max_abs_err")))
    return "\n".join(lines)


def _fmt(v, spec: str) -> str:
    return f"{v:>{spec}}" if v is not None else " " * int(spec.split(".")[0])
