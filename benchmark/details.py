"""What the comparison measured beyond ``summary.json``: per system and rate, every latency
statistic and the attainment under each of the paper's SLO sets; goodput per SLO set and over
an SLO-scale sweep; peak GPU memory per server start.

Written next to the summary by ``benchmark.compare report`` (and at the end of every ``run``):

* ``details.json``::

    {"gpu": str, "model": str,
     "workloads": {name: {
        "slo_sets": {set: {"ttft_s", "tpot_s", "itl_p99"}},        # tight, loose, tpot50
        "runs": {run: {
            "curve": [{"rate", "attainment": {set: a}, "ttft"|"tpot"|"itl"|"e2e":
                       {"mean", "p50", "p90", "p99"}, "request_throughput", ...}],
            "goodput_req_s": {set: value|null},
            "saturation_req_s": value|null,                       # the inf run's throughput
            "goodput_up_to_saturation_req_s": {set: value|null},  # rates <= saturation
            "slo_scale_goodput_req_s": {scale: value|null},        # the tight set scaled
            "peak_gpu_mib": value|null}}}}}

  A semi-PD run's curve rows also carry ``profile`` (``benchmark.phase_profile``: per-phase
  iteration times, busy share, time per SM split).

* ``details.md``: one table per workload, a row per (run, rate).
* ``plots/<workload>_slo_scale.png``: goodput against the SLO scale, one line per run.

Goodput counts finite rates only (a rate-``inf`` run measures throughput), as in
``benchmark.report``; goodput up to saturation only those no higher than the ``inf`` run's
request throughput (:mod:`benchmark.metrics`); ``peak_gpu_mib`` is the highest GPU memory in
use seen while the run's server was up, its start included (``memory_*.json`` of
``benchmark.compare``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from benchmark.metrics import (SLO, SLO_SCALES, attainment, goodput, goodput_up_to,
                               saturation_rate)
from benchmark.report import Runs, run_curve

logger = logging.getLogger(__name__)


def peak_memory_by_run(out_dir: Path) -> dict[str, int]:
    """Run name -> the highest ``peak_gpu_mib`` of the server starts that served it."""
    peaks: dict[str, int] = {}
    for path in sorted(Path(out_dir).glob("memory_*.json")):
        rec = json.loads(path.read_text())
        if rec.get("peak_gpu_mib") is None:
            continue
        for run in rec.get("runs", []):
            peaks[run] = max(peaks.get(run, 0), int(rec["peak_gpu_mib"]))
    return peaks


def profiles_by_run(out_dir: Path) -> dict[str, Any]:
    """Run file stem -> phase profile, from every ``profile_*.json`` in ``out_dir``."""
    found: dict[str, Any] = {}
    for path in sorted(Path(out_dir).glob("profile_*.json")):
        found.update(json.loads(path.read_text()))
    return found


def run_details(points: Mapping[float, Any], slo_sets: Mapping[str, SLO],
                peak_mib: int | None, profiles: Mapping[float, Any] | None = None
                ) -> dict[str, Any]:
    """``details.json``'s entry of one run name (``points``: rate -> RunPoint; ``profiles``:
    rate -> phase profile, where traced)."""
    first, *_ = slo_sets
    curve = run_curve(points, slo_sets[first])
    for row in curve:
        row["attainment"] = {name: attainment(points[row["rate"]].results, slo)
                             for name, slo in slo_sets.items()}
        if profiles and row["rate"] in profiles:
            row["profile"] = profiles[row["rate"]]
        if math.isinf(row["rate"]):
            row["rate"] = "inf"  # strict JSON has no Infinity
    finite = {r: p for r, p in points.items() if math.isfinite(r)}
    atts = {name: {r: attainment(p.results, slo) for r, p in finite.items()}
            for name, slo in slo_sets.items()}
    saturation = saturation_rate(curve)
    return {
        "curve": curve,
        "goodput_req_s": {name: goodput(a) for name, a in atts.items()},
        "saturation_req_s": saturation,
        "goodput_up_to_saturation_req_s": {name: goodput_up_to(a, saturation)
                                           for name, a in atts.items()},
        "slo_scale_goodput_req_s": {
            f"{s:g}": goodput({r: attainment(p.results, slo_sets[first].scaled(s))
                               for r, p in finite.items()}) for s in SLO_SCALES},
        "peak_gpu_mib": peak_mib,
    }


def build_details(gpu: str, model: str, workloads: Mapping[str, tuple[Mapping[str, SLO], Runs]],
                  peaks: Mapping[str, int], profiles: Mapping[str, Any] | None = None,
                  split_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``details.json`` content from per-workload (SLO sets, runs); ``profiles`` by run file
    stem (``<run>_<workload>_<rate>``); ``split_labels``: run -> what its profile's split
    column says instead of the traced split (runs not confined by green contexts)."""
    profiles = profiles or {}
    split_labels = split_labels or {}

    def of(run: str, wname: str, points: Mapping[float, Any]) -> dict[float, Any]:
        return {r: profiles[f"{run}_{wname}_{r:g}"] for r in points
                if f"{run}_{wname}_{r:g}" in profiles}

    def entry(run: str, wname: str, points: Mapping[float, Any]) -> dict[str, Any]:
        out = run_details(points, workloads[wname][0], peaks.get(run), of(run, wname, points))
        if run in split_labels:
            out["split_label"] = split_labels[run]
        return out

    return {"gpu": gpu, "model": model, "workloads": {
        wname: {"slo_sets": {n: slo.to_json() for n, slo in slo_sets.items()},
                "runs": {run: entry(run, wname, points)
                         for run, points in sorted(runs.items()) if points}}
        for wname, (slo_sets, runs) in workloads.items()}}


def _ms(stats: Mapping[str, Any], key: str) -> str:
    v = stats.get(key)
    return "n/a" if v is None else f"{v * 1e3:.1f}"


def details_markdown(details: Mapping[str, Any]) -> str:
    """One table per workload: a row per (run, rate)."""
    lines = [f"GPU: {details['gpu']}  ", f"Model: {details['model']}", ""]
    for wname, w in details["workloads"].items():
        sets = list(w["slo_sets"])
        if not w["runs"]:
            lines += [f"## {wname}", "", "No runs yet.", ""]
            continue
        lines += [f"## {wname}", "", "SLO sets: " + ", ".join(
            f"{n} = TTFT {s['ttft_s']:g} s / {'P99 ITL' if s['itl_p99'] else 'TPOT'} "
            f"{s['tpot_s']:g} s" for n, s in w["slo_sets"].items()), ""]
        head = ["run", "rate", *(f"att. {n}" for n in sets), "TTFT mean/P90/P99 (ms)",
                "TPOT mean/P90/P99 (ms)", "ITL P99/max (ms)", "E2E P90 (s)", "req/s",
                "req/s from 1st token", "peak GPU MiB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for run, rd in w["runs"].items():
            for row in rd["curve"]:
                e2e = row["e2e"].get("p90")
                tput = row.get("request_throughput")
                tput_first = row.get("request_throughput_from_first_token")
                lines.append("| " + " | ".join([
                    run, _rate(row["rate"]), *(f"{row['attainment'][n]:.2f}" for n in sets),
                    "/".join(_ms(row["ttft"], k) for k in ("mean", "p90", "p99")),
                    "/".join(_ms(row["tpot"], k) for k in ("mean", "p90", "p99")),
                    "/".join(_ms(row["itl"], k) for k in ("p99", "max")),
                    "n/a" if e2e is None else f"{e2e:.2f}",
                    "n/a" if tput is None else f"{tput:.2f}",
                    "n/a" if tput_first is None else f"{tput_first:.2f}",
                    "n/a" if rd["peak_gpu_mib"] is None else str(rd["peak_gpu_mib"])]) + " |")
        lines.append("")
        lines += _profile_table(w)
        lines += _speed_table(w)
        lines += ["Goodput (req/s) per SLO set; the same over the rates no higher than the "
                  "run's saturation (its `inf` run's request throughput from the first token); "
                  "and over the first set scaled by "
                  + ", ".join(f"{s:g}" for s in SLO_SCALES) + ":", ""]
        for run, rd in w["runs"].items():
            gps = ", ".join(f"{n} {_rate(v)}" for n, v in rd["goodput_req_s"].items())
            sat = rd.get("saturation_req_s")
            capped = "" if sat is None else f"; up to saturation ({sat:.1f} req/s): " + ", ".join(
                f"{n} {_rate(v)}" for n, v in rd["goodput_up_to_saturation_req_s"].items())
            sweep = " ".join(_rate(v) for v in rd["slo_scale_goodput_req_s"].values())
            lines.append(f"- `{run}`: {gps}{capped}; scale sweep: {sweep}")
        lines.append("")
    return "\n".join(lines)


def _profile_table(w: Mapping[str, Any]) -> list[str]:
    """Semi-PD runs' phase profiles: busy share and iteration P50 per phase, the prefill
    worker's idle time between iterations while requests waited, decode's main split."""
    from benchmark.phase_profile import main_split

    rows = []
    for run, rd in w["runs"].items():
        for row in rd["curve"]:
            prof = row.get("profile")
            if not prof:
                continue
            cells = [run, _rate(row["rate"])]
            for role in ("prefill", "decode"):
                ph = prof[role]
                it = ph["iteration_ms"]
                cells += [f"{ph['busy_share']:.2f}", "n/a" if it is None else f"{it['p50']:.1f}"]
                if role == "prefill":  # absent from profiles made before 2026-12-06
                    gap = ph.get("queued_gap_ms")
                    cells.append("n/a" if gap is None else f"{gap['p50']:.1f}")
            cells += [rd.get("split_label") or main_split(prof) or "n/a", str(prof["resizes"])]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = ["run", "rate", "prefill busy", "prefill iter P50 (ms)",
            "prefill idle with work waiting P50 (ms)", "decode busy",
            "decode iter P50 (ms)", "decode's main split (SMs)", "resizes"]
    return ["Semi-PD phase profile (busy: share of the run's wall time with an iteration "
            "running):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, ""]


def _speed_table(w: Mapping[str, Any]) -> list[str]:
    """Semi-PD runs' per-split speeds (``speed_by_split`` of their phase profiles, absent from
    profiles made before 2026-12-07): P50 and count per split, so that one split's prefill
    or decode can be set against another's in the same run."""
    from benchmark.phase_profile import DECODE_MIN_BATCH, PREFILL_MIN_TOKENS

    rows = []
    for run, rd in w["runs"].items():
        for row in rd["curve"]:
            prof = row.get("profile")
            if not prof or "speed_by_split" not in prof["prefill"]:
                continue
            cells = [run, _rate(row["rate"])]
            for role in ("prefill", "decode"):
                speeds = prof[role]["speed_by_split"]
                cells.append(", ".join(f"{name}: {v['p50']:.1f} ({v['n']})"
                                       for name, v in speeds.items()) or "n/a")
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = ["run", "rate", f"prefill ms per 1,024 tokens (iterations of >= "
            f"{PREFILL_MIN_TOKENS:,} tokens)", f"decode step ms (batch >= {DECODE_MIN_BATCH})"]
    return ["Semi-PD speed per split (prefill/decode SMs): P50 (iterations):", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, ""]


def _rate(v: float | str | None) -> str:
    return "n/a" if v is None else v if isinstance(v, str) else f"{v:g}"


def plot_slo_scale(wname: str, w: Mapping[str, Any], out_dir: Path) -> Path:
    """Goodput against the SLO scale (missing goodput drawn at 0), one line per run."""
    from benchmark.report import _plt

    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, rd in w["runs"].items():
        pts = rd["slo_scale_goodput_req_s"]
        ax.plot([float(s) for s in pts], [v or 0.0 for v in pts.values()], marker="o", label=run)
    first = next(iter(w["slo_sets"].values()))
    ax.set(xlabel=f"SLO scale (x TTFT {first['ttft_s']:g} s, TPOT {first['tpot_s']:g} s)",
           ylabel="goodput (req/s)", title=f"{wname}: goodput vs SLO scale")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{wname}_slo_scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_details(out_dir: Path, gpu: str, model: str,
                  workloads: Mapping[str, tuple[Mapping[str, SLO], Runs]],
                  split_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write details.json, details.md and the SLO-scale plots under ``out_dir``
    (``split_labels``: see :func:`build_details`)."""
    out_dir = Path(out_dir)
    details = build_details(gpu, model, workloads, peak_memory_by_run(out_dir),
                            profiles_by_run(out_dir), split_labels)
    (out_dir / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    (out_dir / "details.md").write_text(details_markdown(details))
    for wname, w in details["workloads"].items():
        if w["runs"]:
            plot_slo_scale(wname, w, out_dir / "plots")
    logger.info("wrote %s/details.json and details.md", out_dir)
    return details
