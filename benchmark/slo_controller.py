"""The SLO controller on the GPU: a load step against a semi-PD server with
``--partition-policy slo``; the split over time and the SLO attainment over time.

    python -m benchmark.slo_controller --model-dir /tmp/models/llama8b --load-format dummy

Poisson arrivals at ``--rate`` req/s for ``--phase-s`` seconds, then at ``--step-factor`` times
the rate (default 2); random token prompts of ``--input-len`` tokens, ``--output-len`` output
tokens (ignore_eos), streamed, so TTFT and TPOT are measured at the client. ``--step-input-len``
/ ``--step-output-len`` also change the mix at the step (e.g. decode-heavy, then prefill-heavy:
a step after which the best static split is another one, so the policy has to move).

The start split (``--prefill-sm-share``) is pinned while the server warms up, and a fresh SLO
policy takes over there when the load begins (``--free-start``: the policy runs from the
server's start, warm-up included). The split in force comes from the scheduler's trace
(``SGLANG_SEMIPD_TRACE``: its ``resize`` records, policy moves and pins alike). Writes
``benchmark/results/slo_controller_<gpu>.json`` (+ ``.png``) with a ``timeline`` of ``{t_s,
prefill_share, attainment}`` per ``--bucket-s`` bucket (attainment of the requests that arrived
in it).

Then, on the same server, the same load (same seed) once per ``--static-shares`` split, pinned
through ``/set_internal_state`` (``semipd_slo_policy: 0``, static): the best of those is
``attainment_static_best``. The SLO-policy run goes first, so it alone pays for anything still
warming up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from benchmark.common import (RESULTS_DIR, gpu_name, gpu_slug, pin_split, print_table,
                              release_to_slo, write_result)
from sglang_semipd.testing.server import (ServerProcess, http_json, python_module_cmd,
                                          sse_events)
from sglang_semipd.trace import read_trace

logger = logging.getLogger(__name__)


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--phase-s", type=float, default=25.0)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--step-factor", type=float, default=2.0,
                    help="the second phase's rate is this times --rate")
    ap.add_argument("--step-input-len", type=int, default=None,
                    help="prompt tokens after the step (default: --input-len)")
    ap.add_argument("--step-output-len", type=int, default=None,
                    help="output tokens after the step (default: --output-len)")
    ap.add_argument("--slo-ttft-ms", type=float, default=500.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=25.0)
    ap.add_argument("--bucket-s", type=float, default=2.0)
    ap.add_argument("--prefill-sm-share", type=float, default=0.5)
    ap.add_argument("--free-start", action="store_true",
                    help="let the SLO policy move during the server's warm-up too")
    ap.add_argument("--static-shares", default="0.25,0.375,0.5,0.625,0.75",
                    help="comma-separated prefill shares to pin and replay the load on "
                         "('' for none)")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--port", type=int, default=31400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-dir", default="/tmp/semipd-logs")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def stream_one(url: str, ids: list[int], output_len: int) -> dict[str, Any]:
    """One streamed /generate; client-side arrival, first-token and end times."""
    body = json.dumps({"input_ids": ids, "stream": True, "sampling_params": {
        "temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}}).encode()
    req = urllib.request.Request(url + "/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    first: Optional[float] = None
    tokens = 0
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            for event in sse_events(resp):
                n = len(event.get("output_ids", []))
                if n > 0 and first is None:
                    first = time.monotonic()
                tokens = max(tokens, n)
    except Exception as exc:  # noqa: BLE001 - counted as a miss
        return {"arrival": t0, "error": repr(exc)}
    end = time.monotonic()
    return {"arrival": t0, "first": first, "end": end, "tokens": tokens}


def load_plan(a: argparse.Namespace) -> tuple[list[tuple[float, list[int], int]], list[dict]]:
    """The two phases' requests, deterministic in ``--seed``: (arrival s, prompt ids, output
    tokens) each, and the phases ({rate, input_len, output_len, start_s, end_s})."""
    rng = random.Random(a.seed)
    phases, t, plan = [], 0.0, []
    mixes = ((a.rate, a.input_len, a.output_len),
             (a.step_factor * a.rate, a.step_input_len or a.input_len,
              a.step_output_len or a.output_len))
    for rate, input_len, output_len in mixes:
        start = t
        while True:
            t += rng.expovariate(rate)
            if t >= start + a.phase_s:
                t = start + a.phase_s
                break
            plan.append((t, [rng.randrange(100, 30000) for _ in range(input_len)], output_len))
        phases.append({"rate": rate, "input_len": input_len, "output_len": output_len,
                       "start_s": start, "end_s": t})
    return plan, phases


def run_load(url: str, a: argparse.Namespace, on_start: Optional[Any] = None
             ) -> tuple[list[dict], list[dict]]:
    """Replay the load plan (``on_start()`` first, right before the first arrival time)."""
    plan, phases = load_plan(a)
    if on_start is not None:
        on_start()
    results: list[dict] = []
    lock = threading.Lock()
    t_begin = time.monotonic()

    def task(ids: list[int], output_len: int) -> None:
        r = stream_one(url, ids, output_len)
        with lock:
            results.append(r)

    with ThreadPoolExecutor(512) as pool:
        for at, ids, output_len in plan:
            delay = t_begin + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(task, ids, output_len)
    for p in phases:
        p["start_mono"], p["end_mono"] = t_begin + p["start_s"], t_begin + p["end_s"]
    return results, phases


def attainment_of(results: list[dict], ttft_s: float, tpot_s: float) -> Optional[float]:
    return sum(met(r, ttft_s, tpot_s) for r in results) / len(results) if results else None


def met(r: dict, ttft_s: float, tpot_s: float) -> bool:
    if "error" in r or r.get("first") is None or r.get("tokens", 0) < 1:
        return False
    tpot = (r["end"] - r["first"]) / max(r["tokens"] - 1, 1)
    return r["first"] - r["arrival"] <= ttft_s and tpot <= tpot_s


def split_changes(rows: list[dict], splits: list[list[int]]) -> list[tuple[float, float]]:
    """(time, prefill share) of every resize the scheduler sent -- the SLO policy's moves and
    loans and every pin through ``/set_internal_state`` alike -- from its trace rows."""
    return [(r["sent_at"], splits[r["split"]][0] / sum(splits[r["split"]])) for r in rows
            if r["kind"] == "resize"]


def share_at(changes: list[tuple[float, float]], t: float, default: float) -> float:
    share = default
    for tc, s in changes:
        if tc <= t:
            share = s
    return share


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    a = parse()
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    trace = log_dir / "trace_slo.jsonl"
    trace.unlink(missing_ok=True)
    cmd = python_module_cmd(
        "sglang_semipd.launch_server", "--model-path", a.model_dir, "--port", str(a.port),
        "--load-format", a.load_format, "--attention-backend", "triton",
        "--sampling-backend", "pytorch", "--grammar-backend", "none",
        "--mem-fraction-static", str(a.mem_fraction_static),
        "--cuda-graph-max-bs-decode", "128", "--disable-radix-cache",
        "--partition-policy", "slo", "--slo-ttft-ms", str(a.slo_ttft_ms),
        "--slo-tpot-ms", str(a.slo_tpot_ms), "--prefill-sm-share", str(a.prefill_sm_share))
    env = dict(os.environ, SGLANG_SEMIPD_TRACE=str(trace))
    gpu = gpu_name()
    with ServerProcess(cmd, a.port, log_dir / "server_slo.log", start_timeout=600,
                       env=env) as s:
        state = http_json(s.url + "/server_info")["internal_states"][0]["semipd"]
        splits, start_split = state["splits"], state["split"]
        if not a.free_start:  # the policy starts fresh, on the start split, with the load
            pinned = pin_split(s.url, a.prefill_sm_share)
            start_split = splits.index(pinned)
        results, phases = run_load(s.url, a, None if a.free_start else
                                   lambda: release_to_slo(s.url))
        time.sleep(2.0)
        static = []
        for share in [float(x) for x in a.static_shares.split(",") if x.strip()]:
            sms = pin_split(s.url, share)
            time.sleep(1.0)
            res, ph = run_load(s.url, a)
            step_at = ph[1]["start_mono"]
            static.append({"prefill_share": round(sms[0] / sum(sms), 4), "sms": sms,
                           "attainment": attainment_of(res, a.slo_ttft_ms / 1e3,
                                                       a.slo_tpot_ms / 1e3),
                           "phase_attainment": [attainment_of(
                               [r for r in res if (r["arrival"] < step_at) == (k == 0)],
                               a.slo_ttft_ms / 1e3, a.slo_tpot_ms / 1e3) for k in (0, 1)],
                           "errors": sum(1 for r in res if "error" in r)})
            logger.info("static %s: attainment %s", sms, static[-1]["attainment"])
            time.sleep(2.0)
    rows = read_trace(trace)
    decisions = [r for r in rows if r["kind"] == "decision"]
    slo_end = phases[-1]["end_mono"]  # later resizes are the static runs' pins
    changes = [(tc, sh) for tc, sh in split_changes(rows, splits) if tc < slo_end]
    start_share = splits[start_split][0] / sum(splits[start_split])
    ttft_s, tpot_s = a.slo_ttft_ms / 1e3, a.slo_tpot_ms / 1e3
    t0 = phases[0]["start_mono"]
    timeline = []
    t = t0
    while t < phases[-1]["end_mono"]:
        bucket = [r for r in results if t <= r["arrival"] < t + a.bucket_s]
        timeline.append({"t_s": round(t - t0, 3),
                         "prefill_share": share_at(changes, t + a.bucket_s / 2, start_share),
                         "attainment": attainment_of(bucket, ttft_s, tpot_s),
                         "requests": len(bucket)})
        t += a.bucket_s
    step = phases[1]["start_mono"]
    first_move = next((tc - step for tc, _ in changes if tc >= step), None)
    per_phase = []
    for p in phases:
        sel = [r for r in results if p["start_mono"] <= r["arrival"] < p["end_mono"]]
        per_phase.append({"rate": p["rate"], "input_len": p["input_len"],
                          "output_len": p["output_len"], "requests": len(sel),
                          "attainment": attainment_of(sel, ttft_s, tpot_s),
                          "errors": sum(1 for r in sel if "error" in r)})
    record = {
        "gpu": gpu, "model": Path(a.model_dir).name,
        "slo": {"ttft_ms": a.slo_ttft_ms, "tpot_ms": a.slo_tpot_ms, "attainment_target": 0.9},
        "phases": per_phase, "timeline": timeline,
        "split_changes": [{"t_s": round(tc - t0, 3), "prefill_share": sh} for tc, sh in changes],
        "decisions": len(decisions), "first_move_after_step_s": first_move,
        "attainment_slo_policy": attainment_of(results, ttft_s, tpot_s),
        "static": static,
        "attainment_static_best": max((x["attainment"] for x in static
                                       if x["attainment"] is not None), default=None),
        "notes": ["static runs: the same load (same seed) replayed on the same server after "
                  "the SLO-policy run, each on one split pinned with "
                  "/set_internal_state semipd_slo_policy=0 (static)"],
        "command": "python -m benchmark.slo_controller " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None)}
    out = Path(a.out) if a.out else RESULTS_DIR / f"slo_controller_{gpu_slug(gpu)}.json"
    write_result(out, record)
    try:
        plot(record, out.with_suffix(".png"))
    except Exception as exc:  # noqa: BLE001
        logger.warning("plot failed: %s", exc)
    print_table([(f"phase {p['rate']} req/s", p) for p in per_phase]
                + [("split changes", len(changes)), ("first move after step (s)", first_move),
                   ("attainment (slo policy)", record["attainment_slo_policy"])]
                + [(f"attainment (static {x['sms'][0]}/{x['sms'][1]} SMs)", x["attainment"])
                   for x in static]
                + [("attainment (static best)", record["attainment_static_best"])],
                f"SLO controller on {gpu}")


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = record["timeline"]
    static = record.get("static") or []
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4),
                                 gridspec_kw={"width_ratios": [3, 1.3]})
    ax.step([x["t_s"] for x in tl], [x["prefill_share"] for x in tl], where="post",
            label="prefill SM share")
    ax.plot([x["t_s"] for x in tl], [x["attainment"] for x in tl], "o-",
            label="SLO attainment (by arrival)")
    first, second = record["phases"][0], record["phases"][-1]
    ax.set_xlabel(f"time (s); step halfway: {first['rate']:g} -> {second['rate']:g} req/s, "
                  f"{first.get('input_len', '?')}/{first.get('output_len', '?')} -> "
                  f"{second.get('input_len', '?')}/{second.get('output_len', '?')} tokens in/out")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(f"SLO controller, {record['model']} on {record['gpu']}")
    names = [f"{x['prefill_share']:.2f}" for x in static] + ["SLO policy"]
    values = [x["attainment"] or 0.0 for x in static] + [record["attainment_slo_policy"] or 0.0]
    bx.bar(names, values, color=["tab:gray"] * len(static) + ["tab:blue"])
    bx.axhline(record["slo"]["attainment_target"], color="tab:red", ls="--", lw=1)
    bx.set_ylim(0, 1.05)
    bx.set_xlabel("static prefill share")
    bx.set_title("attainment, same load")
    bx.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
