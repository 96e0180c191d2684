"""Benchmark report: ``summary.json``, a Markdown table and PNG plots.

Input is, per workload, per run name (a system, or ``sglang_chunked_<size>`` for each stock
chunked-prefill run), per swept request rate, a ``RunPoint`` (per-request results + duration).
``summary.json`` has exactly this shape::

    {"gpu": str, "model": str,
     "workloads": {name: {"slo": {...},
                          "goodput_req_s": {system: value|null},
                          "max_throughput_req_s": {system: value|null}}},
     "notes": {system: reason}}

with the systems of ``SYSTEMS``. Goodput counts the finite swept rates only; a run at rate
``inf`` (every request at once) is the unconstrained one, and max throughput is the highest
request throughput measured over all runs. ``notes`` says where a value is only a bound: goodput
when the highest swept rate still met the target, max throughput when no ``inf`` run exists;
it also gives the goodput over the rates no higher than the ``inf`` run's request throughput
(goodput up to saturation, :mod:`benchmark.metrics`) where that differs.
Two systems are sweeps (``SWEEPS``): ``sglang_chunked_best`` is,
per workload, the ``sglang_chunked_<size>`` run with the best goodput (ties: higher max
throughput), ``semipd_green_static`` likewise the best ``semipd_green_static_<share>`` run; the
choices are recorded in ``notes``.
A system without any run gets null values and must have a reason in ``notes``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmark.metrics import (ATTAINMENT_TARGET, SLO, RequestResult, attainment, goodput,
                               goodput_up_to, latency_summary, saturation_rate)

logger = logging.getLogger(__name__)

SYSTEMS: tuple[str, ...] = ("sglang_chunked_best", "sglang_pdmux", "semipd_green_slo",
                            "semipd_green_static", "semipd_mps", "semipd_none")
CHUNKED_PREFIX = "sglang_chunked_"
CHUNK_SIZES: tuple[int, ...] = (512, 2048, 8192)
STATIC_PREFIX = "semipd_green_static_"
STATIC_SHARES: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75)
# reported system -> prefix of the runs it is the best of (per workload)
SWEEPS: dict[str, str] = {"sglang_chunked_best": CHUNKED_PREFIX,
                          "semipd_green_static": STATIC_PREFIX}


@dataclass
class RunPoint:
    """One bench_serving run of one system at one request rate."""

    rate: float
    results: list[RequestResult] = field(default_factory=list)
    duration_s: float | None = None


Runs = Mapping[str, Mapping[float, RunPoint]]  # run name -> rate -> point


def _key(v: float | None) -> tuple[int, float]:
    return (0, 0.0) if v is None else (1, v)


def run_curve(points: Mapping[float, RunPoint], slo: SLO) -> list[dict[str, Any]]:
    """Per-rate attainment and latency summary of one run name, sorted by rate."""
    rows = []
    for rate in sorted(points):
        p = points[rate]
        rows.append({"rate": rate, "attainment": attainment(p.results, slo),
                     **latency_summary(p.results, p.duration_s)})
    return rows


@dataclass(frozen=True)
class Scores:
    """What the report keeps of one run name's curve."""

    goodput: float | None  # over the finite rates
    max_throughput: float | None  # request throughput, over every run
    goodput_is_bound: bool  # the highest finite rate swept still met the target
    saturated: bool  # an unconstrained (rate inf) run exists
    saturation: float | None = None  # that run's request throughput (from the first token)
    goodput_up_to_saturation: float | None = None  # over the finite rates <= saturation


def system_scores(points: Mapping[float, RunPoint], slo: SLO, interpolate: bool = False
                  ) -> Scores:
    """Goodput, max measured request throughput and their caveats for one run name."""
    curve = run_curve(points, slo)
    finite = [(c["rate"], c["attainment"]) for c in curve if math.isfinite(c["rate"])]
    gp = goodput(finite, ATTAINMENT_TARGET, interpolate)
    tps = [c["request_throughput"] for c in curve if c["request_throughput"] is not None]
    saturation = saturation_rate(curve)
    return Scores(gp, max(tps) if tps else None,
                  bool(finite) and finite[-1][1] >= ATTAINMENT_TARGET,
                  any(math.isinf(c["rate"]) for c in curve), saturation,
                  goodput_up_to(dict(finite), saturation, ATTAINMENT_TARGET, interpolate))


def _bound_notes(wname: str, sc: Scores) -> list[str]:
    notes = []
    if sc.goodput is not None and sc.goodput_is_bound:
        notes.append(f"{wname}: goodput >= {sc.goodput:g} req/s (the highest swept rate met "
                     "the target)")
    if sc.max_throughput is not None and not sc.saturated:
        notes.append(f"{wname}: max throughput of the swept rates only (no rate-inf run)")
    if sc.saturation is not None and sc.goodput_up_to_saturation != sc.goodput:
        capped = "none" if sc.goodput_up_to_saturation is None else \
            f"{sc.goodput_up_to_saturation:g} req/s"
        notes.append(f"{wname}: goodput up to saturation ({sc.saturation:.1f} req/s): {capped}")
    return notes


def select_best(runs: Runs, prefix: str, slo: SLO, interpolate: bool = False
                ) -> tuple[str | None, Scores | None]:
    """The ``<prefix><variant>`` run with the best goodput (ties: higher max throughput)."""
    best: tuple[str | None, Scores | None] = (None, None)
    for name in sorted(n for n in runs if n.startswith(prefix) and n not in SWEEPS):
        sc = system_scores(runs[name], slo, interpolate)
        if best[1] is None or (_key(sc.goodput), _key(sc.max_throughput)) > (
                _key(best[1].goodput), _key(best[1].max_throughput)):
            best = (name, sc)
    return best


def build_summary(gpu: str, model: str, workloads: Mapping[str, tuple[SLO, Runs]],
                  notes: Mapping[str, str] | None = None, interpolate: bool = False,
                  slo_names: Mapping[str, str] | None = None,
                  descriptions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``summary.json`` content (see module docstring) from per-workload (SLO, runs).
    ``notes``: reasons (a system's missing results need no further note); ``descriptions``:
    what a system ran on, put first in its note."""
    given: dict[str, str] = dict(notes or {})
    added: dict[str, list[str]] = {}
    wl_out: dict[str, Any] = {}
    chosen: dict[str, dict[str, str]] = {system: {} for system in SWEEPS}
    for wname, (slo, runs) in workloads.items():
        gps: dict[str, float | None] = {}
        tps: dict[str, float | None] = {}
        for system in SYSTEMS:
            sc: Scores | None = None
            if system in SWEEPS and system not in runs:
                name, sc = select_best(runs, SWEEPS[system], slo, interpolate)
                if name is not None:
                    chosen[system][wname] = name[len(SWEEPS[system]):]
            elif system in runs and runs[system]:
                sc = system_scores(runs[system], slo, interpolate)
            gps[system] = sc.goodput if sc else None
            tps[system] = sc.max_throughput if sc else None
            mine = added.setdefault(system, [])
            if sc is None:
                if system not in given:
                    mine.append(f"no results for workload {wname}")
                continue
            if sc.goodput is None:
                mine.append(f"{wname}: no swept rate reached {ATTAINMENT_TARGET:.0%} attainment")
            mine.extend(_bound_notes(wname, sc))
        slo_json = {**slo.to_json(), "attainment_target": ATTAINMENT_TARGET,
                    "goodput_interpolated": interpolate}
        if slo_names and wname in slo_names:
            slo_json["name"] = slo_names[wname]
        wl_out[wname] = {"slo": slo_json, "goodput_req_s": gps, "max_throughput_req_s": tps}
    what = {"sglang_chunked_best": "chunked_prefill_size",
            "semipd_green_static": "prefill SM share"}
    for system, picks in chosen.items():
        if picks:
            added.setdefault(system, []).insert(0, f"best {what[system]} by goodput: " + ", ".join(
                f"{w}={c}" for w, c in picks.items()))
    described = {s: d for s, d in (descriptions or {}).items() if s in SYSTEMS}
    notes_out = {s: "; ".join([*([described[s]] if s in described else []),
                               *([given[s]] if s in given else []), *added.get(s, [])])
                 for s in [*given, *(s for s in SYSTEMS if s not in given)]
                 if s in given or added.get(s) or s in described}
    return {"gpu": gpu, "model": model, "workloads": wl_out, "notes": notes_out}


def markdown_table(summary: Mapping[str, Any]) -> str:
    """A Markdown table: one row per (workload, system) with goodput and max throughput."""
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines = [f"GPU: {summary['gpu']}  ", f"Model: {summary['model']}", "",
             "| workload | SLO (TTFT s / TPOT s) | system | goodput (req/s) | max throughput (req/s) |",
             "|---|---|---|---:|---:|"]
    for wname, w in summary["workloads"].items():
        slo = w["slo"]
        slo_txt = f"{slo['ttft_s']:g} / {slo['tpot_s']:g}" + (" (P99 ITL)" if slo.get("itl_p99") else "")
        for system in w["goodput_req_s"]:
            lines.append(f"| {wname} | {slo_txt} | {system} | {fmt(w['goodput_req_s'][system])} | "
                         f"{fmt(w['max_throughput_req_s'][system])} |")
    if summary.get("notes"):
        lines += ["", "Notes:", ""] + [f"- `{k}`: {v}" for k, v in summary["notes"].items()]
    return "\n".join(lines) + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_workload(wname: str, slo: SLO, runs: Runs, out_dir: Path) -> list[Path]:
    """attainment-vs-rate and P90 TTFT/TPOT-vs-rate PNGs for one workload; returns paths."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {name: [p for p in run_curve(pts, slo) if math.isfinite(p["rate"])]
              for name, pts in sorted(runs.items()) if pts}  # rate inf: no x position
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ax.plot([p["rate"] for p in c], [p["attainment"] for p in c], marker="o", label=name)
    ax.axhline(ATTAINMENT_TARGET, color="grey", ls="--", lw=1)
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(0, 1.05),
           title=f"{wname}: TTFT<={slo.ttft_s:g}s, {'P99 ITL' if slo.itl_p99 else 'TPOT'}<={slo.tpot_s:g}s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{wname}_attainment.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for metric, ax, target in (("ttft", axes[0], slo.ttft_s), ("tpot", axes[1], slo.tpot_s)):
        for name, c in curves.items():
            xs = [p["rate"] for p in c if p[metric]["p90"] is not None]
            ys = [p[metric]["p90"] for p in c if p[metric]["p90"] is not None]
            ax.plot(xs, ys, marker="o", label=name)
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.set(xlabel="request rate (req/s)", ylabel=f"P90 {metric.upper()} (s)", title=f"{wname}: P90 {metric.upper()}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{wname}_latency_p90.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_goodput(summary: Mapping[str, Any], out_dir: Path,
                 wnames: Sequence[str] | None = None) -> Path:
    """Grouped bars of goodput per system per workload (missing values drawn as 0, labelled
    n/a); ``wnames``: the workloads to show (default: all of the summary's)."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    wnames = list(summary["workloads"] if wnames is None else wnames)
    width = 0.8 / len(SYSTEMS)
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(wnames) + 3), 4.5))
    for j, system in enumerate(SYSTEMS):
        vals = [summary["workloads"][w]["goodput_req_s"].get(system) for w in wnames]
        xs = [i + (j - (len(SYSTEMS) - 1) / 2) * width for i in range(len(wnames))]
        bars = ax.bar(xs, [v or 0.0 for v in vals], width, label=system)
        for b, v in zip(bars, vals):
            if v is None:
                ax.text(b.get_x() + b.get_width() / 2, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(wnames)), wnames)
    ax.set(ylabel="goodput (req/s)", title=f"goodput @ {ATTAINMENT_TARGET:.0%} SLO attainment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "goodput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: Path, gpu: str, model: str, workloads: Mapping[str, tuple[SLO, Runs]],
                 notes: Mapping[str, str] | None = None, interpolate: bool = False,
                 slo_names: Mapping[str, str] | None = None,
                 descriptions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write summary.json, summary.md and plots under ``out_dir``; returns the summary
    (``notes``, ``descriptions``: see :func:`build_summary`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(gpu, model, workloads, notes, interpolate, slo_names, descriptions)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown_table(summary))
    plots: list[Path] = []
    measured = [w for w, (_, runs) in workloads.items() if any(runs.values())]
    for w, (slo, runs) in workloads.items():
        if w in measured:
            plots += plot_workload(w, slo, runs, out_dir / "plots")
        else:  # no run: no empty plot (and none left from an earlier report)
            for stale in (f"{w}_attainment.png", f"{w}_latency_p90.png"):
                (out_dir / "plots" / stale).unlink(missing_ok=True)
    plots.append(plot_goodput(summary, out_dir / "plots", measured or None))
    logger.info("wrote %s/summary.json, summary.md and %d plots", out_dir, len(plots))
    return summary


def check_summary_shape(summary: Mapping[str, Any], systems: Sequence[str] = SYSTEMS) -> list[str]:
    """Problems with a summary's shape (empty list when it is well-formed)."""
    problems = []
    if not {"gpu", "model", "workloads", "notes"} <= set(summary) <= {
            "gpu", "model", "workloads", "notes", "command"}:
        problems.append(f"top-level keys {sorted(summary)}")
        return problems
    for w, body in summary["workloads"].items():
        if set(body) != {"slo", "goodput_req_s", "max_throughput_req_s"}:
            problems.append(f"{w}: keys {sorted(body)}")
            continue
        for k in ("goodput_req_s", "max_throughput_req_s"):
            if set(body[k]) != set(systems):
                problems.append(f"{w}.{k}: systems {sorted(body[k])}")
            for s, v in body[k].items():
                if v is None and s not in summary["notes"]:
                    problems.append(f"{w}.{k}.{s} is null without a note")
    return problems
