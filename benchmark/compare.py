"""Semi-PD against stock SGLang (chunked prefill 512/2048/8192, PD multiplexing) on one GPU:
the same model, port and workloads, system after system; goodput, SLO attainment and plots.

Two steps, because the GPU host is offline and takes 64 MiB per call:

  # here: build the workloads (ShareGPT first turns, the Azure conversation trace, long prompts)
  python -m benchmark.compare prepare --out .gpu/bench --num 400
  # on the GPU host (carry .gpu): run every system over every workload and rate
  python -m benchmark.compare run --workloads .gpu/bench --model-dir /tmp/models/llama8b \
      --load-format dummy --rates 2,4,8,16,inf [--systems ...] [--only-workloads ...] \
      [--duration-s 15] [--out-dir DIR] [--dry-run]
  # here: merge a device call's output directory into DIR, report from every run file in DIR
  python -m benchmark.compare report --workloads .gpu/bench --out-dir benchmark/results/h100 \
      [--merge-from CALL_DIR ...]

A device call runs for at most 10 minutes; one 8B server start took about 1 of them on the H100
(stock and semi-PD alike, Triton cache carried) and each rate 30-40 s, so the
full comparison takes several calls, each with a few ``--systems`` and ``--duration-s`` (each
rate replays ``ceil(rate x duration)`` requests of the workload, at least ``--min-requests``,
at most all); ``--rates`` may end with ``inf``, the unconstrained run that max throughput comes
from, and ``--warmup-requests`` (default 32) are replayed and discarded after each server
start. Every run leaves ``<run>_<workload>_<rate>.jsonl`` in the output directory (``report
--merge-from`` keeps it compacted as ``.jsonl.gz``: see ``compact_record``), with
``meta.json`` (GPU, model, the commands) and ``notes.json`` (systems that did not start);
``report`` (and the end of every ``run``) rebuilds ``summary.json`` from all of them. Systems
with no run yet are null in the summary, with the note "not run".

Runs: stock chunked prefill at each size (the report keeps the best per workload), stock
``--enable-pdmux``, semi-PD ``green`` with the SLO policy (one server per SLO set, started with
that set's tight targets), ``green`` static at each share of ``report.STATIC_SHARES`` (the best
is reported as ``semipd_green_static``), ``mps`` and ``none``.

The static splits share one server (started with the first share, ``--partition-policy
static``): before each split's runs it is pinned there through ``/set_internal_state``
(``semipd_slo_policy: 0`` + ``semipd_prefill_sm_share``), which saves a server start
(about a minute for the 8B shape) per split.

Besides the run files, each server start leaves ``memory_<server>.json`` (peak GPU memory,
``benchmark.common.PeakGpuMemory``) and, for semi-PD, ``profile_<server>.json`` (per-phase
iteration times and split shares per run, ``benchmark.phase_profile``, from the scheduler's
trace); ``report`` merges both and writes ``details.json`` / ``details.md``
(``benchmark.details``) next to the summary.

``run`` starts each system once (``testing.server.ServerProcess``), replays each workload with
SGLang's own ``bench_serving`` (``--dataset-name openai --output-details``) at each Poisson
rate, stops it, and writes ``benchmark/results/<gpu>/`` (``summary.json`` with the keys of
``report.SYSTEMS``, ``summary.md``, plots, one bench_serving JSONL per run). A system that does
not start is recorded under ``notes`` with the reason (e.g. pdmux).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmark import workloads as W
from benchmark.metrics import PAPER_SLOS, results_from_details
from benchmark.report import STATIC_SHARES
from sglang_semipd.stack_sampler import SAMPLES_ENV
from sglang_semipd.trace import TRACE_ENV, read_trace

logger = logging.getLogger(__name__)

# run name -> (launcher module, flags of that system); sglang_chunked_best is chosen per
# workload among the sglang_chunked_<size> runs by the report.
# Semi-PD prefills in 2,048-token chunks, like the stock run it is compared with (without the
# flag SGLang picks 8,192 on the H100, and semi-PD's prefill batches of several long prompts,
# 160-436 ms each, made its TTFT misses at light and moderate load).
SEMIPD_CHUNK = ("--chunked-prefill-size", "2048")
GREEN_SLO_DEFAULT_CHUNK = ("--sm-partition", "green", "--partition-policy", "slo")
GREEN_SLO = (*GREEN_SLO_DEFAULT_CHUNK, *SEMIPD_CHUNK)
SYSTEM_RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sglang_chunked_512": ("sglang.launch_server", ("--chunked-prefill-size", "512")),
    "sglang_chunked_2048": ("sglang.launch_server", ("--chunked-prefill-size", "2048")),
    "sglang_chunked_8192": ("sglang.launch_server", ("--chunked-prefill-size", "8192")),
    # SGLang 0.5.17's ServerArgs asserts that PD multiplexing runs without chunked prefill
    # and without the overlap scheduler
    "sglang_pdmux": ("sglang.launch_server", ("--enable-pdmux", "--chunked-prefill-size", "-1",
                                              "--disable-overlap-schedule")),
    "semipd_green_slo": ("sglang_semipd.launch_server", GREEN_SLO),
    **{f"semipd_green_static_{share:g}": (
        "sglang_semipd.launch_server", ("--sm-partition", "green", "--partition-policy",
                                        "static", "--prefill-sm-share", f"{share:g}",
                                        *SEMIPD_CHUNK))
       for share in STATIC_SHARES},
    "semipd_mps": ("sglang_semipd.launch_server", ("--sm-partition", "mps", *SEMIPD_CHUNK)),
    "semipd_none": ("sglang_semipd.launch_server", ("--sm-partition", "none", *SEMIPD_CHUNK)),
    # diagnostic, in no summary system: stock SGLang on the non-overlapped loop (the prefill
    # worker's, and the decode worker's under --no-decode-overlap), i.e. how much of a gap to
    # stock is SGLang's overlap scheduler
    "diag_sglang_no_overlap_2048": ("sglang.launch_server", (
        "--chunked-prefill-size", "2048", "--disable-overlap-schedule")),
    # diagnostic: semi-PD green + SLO as it was benchmarked up to session 9 (2026-12-06): the
    # decode worker on SGLang's non-overlapped loop, SGLang's default chunk (8,192 on the H100)
    "diag_semipd_green_slo_no_overlap_8192": ("sglang_semipd.launch_server", (
        *GREEN_SLO_DEFAULT_CHUNK, "--no-decode-overlap")),
    "diag_semipd_none_no_overlap_8192": ("sglang_semipd.launch_server", (
        "--sm-partition", "none", "--no-decode-overlap")),  # the same, no partition
    # diagnostic: semipd_green_slo in SGLang's default chunk (8,192 on the H100); first run
    # 2026-12-06 as diag_semipd_green_slo_decode_overlap, before the decode overlap was default
    "diag_semipd_green_slo_default_chunk": ("sglang_semipd.launch_server",
                                            GREEN_SLO_DEFAULT_CHUNK),
    # diagnostic: the decode worker on the non-overlapped loop, otherwise semipd_green_slo
    "diag_semipd_green_slo_no_decode_overlap": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--no-decode-overlap")),
    # diagnostic: an idle side keeps one 8-SM group and lends the rest (at saturation the
    # decode-only tail of a run ran on 92 of 132 SMs under the default loans)
    "diag_semipd_green_slo_idle_loan_most": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--idle-loan", "most")),
    # diagnostic: the prefill batch handed off in one memory-manager call (--batch-handoff)
    "diag_semipd_green_slo_batch_handoff": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--batch-handoff")),
    # diagnostic: that, and the prefill worker on SGLang's overlap loop (--prefill-overlap)
    "diag_semipd_green_slo_prefill_overlap": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--batch-handoff", "--prefill-overlap")),
    # diagnostic: half of each chunk's budget held back for the prompts waiting behind a long
    # chunked one (--prefill-chunk-reserve; session 14's TTFT tails were such waits)
    "diag_semipd_green_slo_chunk_reserve": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--prefill-chunk-reserve", "0.5")),
    # diagnostic: the prefill worker replays SGLang's prefill CUDA graphs, one set per split
    # (--prefill-graphs); stock SGLang replays them for the Llama shape by default, semi-PD's
    # prefill worker otherwise runs eagerly
    "diag_semipd_green_slo_prefill_graphs": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--prefill-graphs")),
    # diagnostic: while a request waits for its first token past half the TTFT target, the
    # prefill worker runs on all SMs (--burst-unconfined); the ShareGPT TTFT misses were
    # bursts of long prompts on the prefill worker's 72-104 SMs, and `none` met the tight SLO
    # where green did not
    "diag_semipd_green_slo_burst_unconfined": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--burst-unconfined")),
    # diagnostic: that with the prefill worker on SGLang's prefill CUDA graphs
    "diag_semipd_green_slo_burst_prefill_graphs": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--burst-unconfined", "--prefill-graphs")),
    # diagnostic: the prefill side's SMs lent to decode whenever no request waits for its
    # first token (--eager-loan); under load the SLO policy's 104/28 left decode 28 SMs while
    # the prefill worker was busy 14-22% of the time, and window loans never came
    "diag_semipd_green_slo_eager_loan": ("sglang_semipd.launch_server", (
        *GREEN_SLO, "--eager-loan")),
}
COMMON_FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch",
                "--grammar-backend", "none")
# the KV pool's share of GPU memory, every system alike (--mem-fraction-static of `run`); the
# DeepSeek-V2-Lite shape needs less: at 0.85 stock SGLang ran out of memory at ~400 running
# requests (the triton MLA decode's 3.1 GiB attn_logits buffer, past the graphs' batch sizes)
MEM_FRACTION_STATIC = 0.85
SLO_SET = {"sharegpt": "sharegpt", "azure_conv": "sharegpt", "long": "longbench"}
SLO_DRIVEN = frozenset({"semipd_green_slo", *(r for r in SYSTEM_RUNS
                                             if r.startswith("diag_semipd_green_slo_"))})  # started once per SLO set, with its targets


def slo_flags(slo_set: str) -> tuple[str, ...]:
    """The SLO-policy flags for a workload's (tight) SLOs."""
    slo = PAPER_SLOS[slo_set]["tight"]
    return ("--slo-ttft-ms", f"{slo.ttft_s * 1e3:g}", "--slo-tpot-ms", f"{slo.tpot_s * 1e3:g}")


PINNED = {run: float(run[len("semipd_green_static_"):]) for run in SYSTEM_RUNS
          if run.startswith("semipd_green_static_")}  # run -> prefill share


def server_runs(system: str, index: dict[str, Any], model_dir: str, load_format: str,
                port: int, mem_fraction: float = MEM_FRACTION_STATIC
                ) -> list[tuple[list[str], dict[str, Any]]]:
    """(server command, the workloads it serves) for one system: one server for all
    workloads, or, for an SLO-driven system, one per SLO set with that set's targets."""
    if system not in SLO_DRIVEN:
        return [(server_command(system, model_dir, load_format, port,
                                mem_fraction=mem_fraction), index)]
    groups: dict[str, dict[str, Any]] = {}
    for wname, meta in index.items():
        groups.setdefault(meta["slo_set"], {})[wname] = meta
    return [(server_command(system, model_dir, load_format, port, slo_flags(slo_set),
                            mem_fraction), group)
            for slo_set, group in sorted(groups.items())]


def server_plan(systems: Sequence[str], index: dict[str, Any], model_dir: str,
                load_format: str, port: int, mem_fraction: float = MEM_FRACTION_STATIC
                ) -> list[tuple[list[str], list[str], dict[str, Any]]]:
    """(server command, the runs it serves in order, their workloads), one entry per server
    start: the pinned static splits requested share the first one's server."""
    plan: list[tuple[list[str], list[str], dict[str, Any]]] = []
    pinned = [s for s in systems if s in PINNED]
    for s in systems:
        if s in PINNED:
            if s == pinned[0]:
                plan.append((server_command(s, model_dir, load_format, port,
                                            mem_fraction=mem_fraction), pinned, index))
            continue
        plan += [(cmd, [s], group) for cmd, group in server_runs(
            s, index, model_dir, load_format, port, mem_fraction)]
    return plan


def partition_label(run: str) -> Optional[str]:
    """The phase profile's split for a semi-PD run whose SMs no green context confines:
    ``none`` runs on all SMs, ``mps`` on the thread percentages of its ``--prefill-sm-share``
    (the split its trace names is only the planned green pair nearest that share). None for
    green and stock runs."""
    from sglang_semipd.config import SemiPDConfig
    from sglang_semipd.workers import mps_thread_percentage

    module, flags = SYSTEM_RUNS.get(run, ("", ()))
    if module != "sglang_semipd.launch_server":
        return None

    def flag(name: str) -> Optional[str]:
        return flags[flags.index(name) + 1] if name in flags else None

    mode = flag("--sm-partition") or SemiPDConfig.sm_partition
    if mode == "none":
        return "all SMs (none)"
    if mode == "mps":
        share = float(flag("--prefill-sm-share") or SemiPDConfig.prefill_sm_share)
        return "MPS threads {}%/{}%".format(*(mps_thread_percentage(role, share)
                                               for role in ("prefill", "decode")))
    return None


def server_command(run: str, model_dir: str, load_format: str, port: int,
                   extra: Sequence[str] = (), mem_fraction: float = MEM_FRACTION_STATIC
                   ) -> list[str]:
    module, flags = SYSTEM_RUNS[run]
    # while stack sampling is on, the HTTP process and its children are sampled too
    # (benchmark/sampled_server.py)
    launch = (["-m", "benchmark.sampled_server", module] if os.environ.get(SAMPLES_ENV)
              else ["-m", module])
    return [sys.executable, *launch, "--model-path", model_dir, "--load-format",
            load_format, "--port", str(port), *COMMON_FLAGS, "--mem-fraction-static",
            f"{mem_fraction:g}", *flags, *extra]


# ---------------------------------------------------------------- prepare (CPU, online)
def prepare(out: Path, num: int, seed: int = 0) -> dict[str, Any]:
    """Write ``<name>.jsonl`` (bench_serving openai dataset) + ``workloads.json`` (lengths)."""
    out.mkdir(parents=True, exist_ok=True)
    made = {"sharegpt": W.sharegpt_workload(num),
            "azure_conv": W.truncate(W.azure_trace_workload(limit=num), max_requests=num),
            "long": W.long_prompt_workload(max(num // 4, 20))}
    index = {}
    for name, wl in made.items():
        path = W.export_openai_jsonl(wl, out / f"{name}.jsonl", seed=seed)
        index[name] = {"file": path.name, "requests": len(wl),
                       "prompt_lens": [int(r.prompt_len) for r in wl.requests],
                       "summary": W.summarize(wl), "slo_set": SLO_SET[name]}
    (out / "workloads.json").write_text(json.dumps(index) + "\n")
    return index


# ---------------------------------------------------------------- run (GPU host)
def run_bench(port: int, path: Path, num: int, rate: float, out_file: Path, log: Path,
              timeout_s: float) -> tuple[dict[str, Any], str]:
    from benchmark.common import run_bench_serving

    return run_bench_serving(port, W.openai_bench_args(path, num, rate), out_file, log,
                             timeout_s)


def requests_at(meta: dict[str, Any], rate: float, duration_s: Optional[float],
                min_requests: int = 20) -> int:
    """How many of a workload's requests one rate replays: all of them, or about
    ``duration_s`` seconds' worth (at least ``min_requests``, at most all). The unconstrained
    run (rate ``inf``, every request at once: max throughput) replays all of them."""
    if duration_s is None or math.isinf(rate):
        return int(meta["requests"])
    return min(int(meta["requests"]), max(min_requests, math.ceil(rate * duration_s)))


def run_file(out_dir: Path, run: str, wname: str, rate: float) -> Path:
    return out_dir / f"{run}_{wname}_{rate:g}.jsonl"


RUN_SUFFIXES = (".jsonl", ".jsonl.gz")  # bench_serving's own file; the merged, compact one


def run_files(out_dir: Path, prefix: str) -> list[Path]:
    """Run files (either suffix) whose names start with ``prefix``."""
    return sorted(p for sfx in RUN_SUFFIXES for p in out_dir.glob(f"{prefix}*{sfx}"))


def run_stem(path: Path) -> str:
    """``<run>_<workload>_<rate>`` of a run file of either suffix."""
    return path.name.removesuffix(".gz").removesuffix(".jsonl")


def last_record(path: Path) -> dict[str, Any]:
    """The last JSON line of a run file (bench_serving appends one per run)."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" \
        else path.read_text()
    return json.loads([ln for ln in text.splitlines() if ln.strip()][-1])


def load_point(path: Path, meta: dict[str, Any]) -> Any:
    """The RunPoint of one run file (its last bench_serving record)."""
    from benchmark.report import RunPoint

    rec = last_record(path)
    rate = float(run_stem(path).rsplit("_", 1)[1])
    return RunPoint(rate, results_from_details(rec, input_lens=meta["prompt_lens"]),
                    rec.get("duration"))


def collect(out_dir: Path, index: dict[str, Any]) -> dict[str, dict[str, dict[float, Any]]]:
    """{workload: {run: {rate: RunPoint}}} from every run file in ``out_dir`` (runs of earlier
    calls included); a file that does not parse is skipped with a warning."""
    found: dict[str, dict[str, dict[float, Any]]] = {w: {} for w in index}
    for wname, meta in index.items():
        for run in SYSTEM_RUNS:
            for path in run_files(out_dir, f"{run}_{wname}_"):
                try:
                    point = load_point(path, meta)
                except (ValueError, KeyError, IndexError) as exc:
                    logger.warning("%s skipped: %r", path.name, exc)
                    continue
                found[wname].setdefault(run, {})[point.rate] = point
    return found


def warmup_plan(index: dict[str, Any], rates: Sequence[float], requests: int
                ) -> Optional[tuple[str, float, int]]:
    """(workload, rate, requests) of the discarded warm-up run after a server start: the
    first workload at the lowest finite swept rate (None without one, or for 0 requests)."""
    finite = [r for r in rates if math.isfinite(r)]
    if requests <= 0 or not index or not finite:
        return None
    return next(iter(index)), min(finite), min(requests, int(next(iter(index.values()))["requests"]))


def run_system(runs: Sequence[str], cmd: list[str], index: dict[str, Any], wl_dir: Path,
               rates: Sequence[float], port: int, out_dir: Path, timeout_s: float,
               duration_s: Optional[float] = None, min_requests: int = 20,
               warmup_requests: int = 0) -> Optional[str]:
    """Serve the runs of one server start (pinned static splits: one after the other on the
    same server), leaving one run file per (run, workload, rate) in ``out_dir``; returns the
    reason it could not run, if it could not. A fresh server's first requests meet kernels
    not compiled yet and, under the SLO policy, a split still settling (on the H100 the first
    run's P90 TTFT was about twice the next one's, on stock SGLang and semi-PD alike), so
    ``warmup_requests`` are replayed first and discarded (``warmup_<run>.jsonl``)."""
    from benchmark.common import PeakGpuMemory, pin_split
    from sglang_semipd.testing.server import ServerProcess, ServerStartError

    key = f"{runs[0]}_{'-'.join(index)}"
    # semi-PD servers are traced (per-iteration records) for the per-phase profile
    trace = out_dir / f"trace_{key}.jsonl" if "sglang_semipd.launch_server" in cmd else None
    env = {**os.environ, TRACE_ENV: str(trace)} if trace else None
    windows: dict[str, tuple[float, float]] = {}  # run file stem -> monotonic window
    splits = None
    try:
        log = out_dir / f"server_{key}.log"
        with PeakGpuMemory() as mem, ServerProcess(cmd, port, log, start_timeout=600,
                                                   env=env) as server:
            if trace:
                splits = server_splits(server.url)
            warm = warmup_plan(index, rates, warmup_requests)
            if warm is not None:
                wname, rate, n = warm
                logger.info("%s: warm-up, %d requests of %s at %g req/s (discarded)",
                            runs[0], n, wname, rate)
                run_bench(port, wl_dir / index[wname]["file"], n, rate,
                          out_dir / f"warmup_{runs[0]}.jsonl",
                          out_dir / f"bench_warmup_{runs[0]}.log", timeout_s)
            for run in runs:
                if run in PINNED:
                    pin_split(f"http://127.0.0.1:{port}", PINNED[run])
                for wname, meta in index.items():
                    for rate in rates:
                        n = requests_at(meta, rate, duration_s, min_requests)
                        logger.info("%s on %s at %g req/s: %d requests", run, wname, rate, n)
                        path, t0 = run_file(out_dir, run, wname, rate), time.monotonic()
                        try:
                            run_bench(port, wl_dir / meta["file"], n, rate, path,
                                      out_dir / f"bench_{run_stem(path)}.log", timeout_s)
                        except Exception as exc:  # the server died under it: say why, go on
                            if server.proc.poll() is None and server.healthy():
                                raise
                            path.unlink(missing_ok=True)  # a run cut short is no result
                            return died_during(f"{run} on {wname} at {rate:g} req/s",
                                               exc, server.log_tail(200))
                        windows[run_stem(path)] = (t0, time.monotonic())
    except ServerStartError as exc:
        return start_failure(str(exc))
    finally:  # the server's start included: what a user must have free for it
        (out_dir / f"memory_{key}.json").write_text(json.dumps({
            "runs": list(runs), "workloads": list(index), "peak_gpu_mib": mem.peak_mib,
            "samples": mem.samples}) + "\n")
        if trace is not None and windows:
            write_profiles(out_dir / f"profile_{key}.json", read_trace(trace), windows, splits)
    return None


def server_splits(url: str) -> Optional[list[list[Any]]]:
    """The planned splits ([prefill, decode] SMs) of a semi-PD server (None if it does not
    say); its burst split (``--burst-unconfined``) as ``["all", decode]``."""
    from sglang_semipd.testing.server import http_json

    try:
        state = http_json(url + "/server_info")["internal_states"][0]["semipd"]
        splits = [list(s) for s in state["splits"]]
        burst = state.get("burst_split")
        if burst is not None:
            splits[burst][0] = "all"
        return splits
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        logger.warning("no split list from %s: %r", url, exc)
        return None


def write_profiles(path: Path, rows: Sequence[dict[str, Any]],
                   windows: dict[str, tuple[float, float]],
                   splits: Optional[Sequence[Sequence[int]]]) -> None:
    """``profile_<server>.json``: {run file stem: per-phase profile of its window}."""
    from benchmark.phase_profile import profile_window

    path.write_text(json.dumps({stem: profile_window(rows, t0, t1, splits)
                                for stem, (t0, t1) in windows.items()}, indent=1) + "\n")


def write_merged_report(out_dir: Path, index: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` (+ Markdown, plots) from every run file in ``out_dir``, with the GPU,
    model and commands of ``meta.json`` and the reasons of ``notes.json``."""
    from benchmark.details import write_details
    from benchmark.report import SWEEPS, SYSTEMS, write_report

    meta = json.loads((out_dir / "meta.json").read_text())
    notes_path = out_dir / "notes.json"
    notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
    found = collect(out_dir, index)
    ran = {run for runs in found.values() for run in runs}
    labels = {run: label for run in SYSTEM_RUNS if (label := partition_label(run))}
    described: dict[str, str] = {}
    for system in SYSTEMS:
        prefix = SWEEPS.get(system)
        done = any(r.startswith(prefix) for r in ran) if prefix else system in ran
        if not done and system not in notes:
            notes[system] = "not run"
        elif done and system in labels:
            described[system] = f"ran on {labels[system]}"
    work = {w: (PAPER_SLOS[m["slo_set"]]["tight"], found[w]) for w, m in index.items()}
    summary = write_report(out_dir, meta["gpu"], meta["model"], work, notes,
                           descriptions=described)
    write_details(out_dir, meta["gpu"], meta["model"],
                  {w: (PAPER_SLOS[m["slo_set"]], found[w]) for w, m in index.items()}, labels)
    summary["command"] = " && ".join(meta.get("commands", []))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


DETAIL_KEYS_DROPPED = ("generated_texts", "server_info")  # bulky, not used by the report
TIME_DECIMALS = 5  # merged TTFTs and ITLs are kept to 10 us


def compact_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A run's last bench_serving record as the results directory keeps it: without texts
    and server info, TTFTs and ITLs rounded to 10 us (a run of 128 ShareGPT requests: 820 KB
    of JSON -> 48 KB gzipped; each value moves by <= 5 us, a TPOT, the mean of a request's
    ITLs, too)."""
    out = {k: v for k, v in rec.items() if k not in DETAIL_KEYS_DROPPED}
    if "ttfts" in out:
        out["ttfts"] = [round(float(t or 0.0), TIME_DECIMALS) for t in out["ttfts"]]
    if "itls" in out:
        out["itls"] = [[round(float(x), TIME_DECIMALS) for x in (gaps or [])]
                       for gaps in out["itls"]]
    return out


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*")


def start_failure(message: str) -> str:
    """The ``notes.json`` reason for a server that did not start: the first line of
    ``message`` (a :class:`ServerStartError`, whose text ends with the server log's tail) and
    the last exception line in that tail, e.g. SGLang's own error."""
    lines = message.splitlines()
    why = f"did not start: {(lines[0] if lines else '')[:300]}"
    raised = [ln.strip() for ln in lines[1:] if _EXCEPTION_LINE.match(ln.strip())]
    return f"{why} {raised[-1][:300]}" if raised else why


def died_during(what: str, exc: BaseException, log_tail: str) -> str:
    """The ``notes.json`` reason for a server that died during a run (the runs before it
    keep their results; the next system still runs): which run, and the last exception
    line of the server log's tail (e.g. SGLang's CUDA out-of-memory), else the client's."""
    raised = [ln.strip() for ln in log_tail.splitlines() if _EXCEPTION_LINE.match(ln.strip())]
    why = raised[-1] if raised else f"{type(exc).__name__}: {exc}"
    return f"died during {what}: {why[:300]}"


def merge_memory(new: dict[str, Any], held: dict[str, Any]) -> None:
    """Fold one call's ``memory_<server>.json`` into the one ``held`` from earlier calls
    (the same server key started again): the higher peak and its samples, the runs of both."""
    runs = [*held.get("runs", []), *(r for r in new.get("runs", []) if r not in held.get("runs", []))]
    if (new.get("peak_gpu_mib") or 0) >= (held.get("peak_gpu_mib") or 0):
        held.update(new)
    held["runs"] = runs


def merge_call(src: Path, out_dir: Path) -> int:
    """Bring one device call's output directory into ``out_dir``: its run files (their last
    record, compacted, gzipped), its commands (``meta.json``) and its notes; returns how many
    run files. Runs of another GPU or model are refused: one report is one GPU and model."""
    src_meta = json.loads((src / "meta.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "meta.json"
    held = json.loads(dst.read_text()) if dst.exists() else {}
    for key in ("gpu", "model"):
        if key in held and held[key] != src_meta[key]:
            raise ValueError(f"{src} ran {key} {src_meta[key]}, {out_dir} holds {held[key]}: "
                             "one results directory per GPU and model")
    n = 0
    for path in run_files(src, ""):
        if not any(path.name.startswith(r + "_") for r in SYSTEM_RUNS):
            continue
        try:
            rec = compact_record(last_record(path))
        except (IndexError, ValueError):
            continue
        name = run_stem(path)
        (out_dir / f"{name}.jsonl").unlink(missing_ok=True)  # an uncompacted earlier merge
        data = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        (out_dir / f"{name}.jsonl.gz").write_bytes(gzip.compress(data, 9, mtime=0))
        n += 1
    for path in src.glob("profile_*.json"):  # per server: {run stem: profile}, merged
        new = json.loads(path.read_text())
        _update_json(out_dir / path.name, lambda m, new=new: m.update(new))
    for path in src.glob("memory_*.json"):  # per server
        _update_json(out_dir / path.name, partial(merge_memory, json.loads(path.read_text())))
    _update_json(dst, lambda m: m.update(
        gpu=src_meta["gpu"], model=src_meta["model"],
        commands=[*m.get("commands", []), *(c for c in src_meta.get("commands", [])
                                            if c not in m.get("commands", []))]))
    notes = json.loads((src / "notes.json").read_text()) if (src / "notes.json").exists() else {}

    def merge_notes(m: dict) -> None:
        m.update(notes)
        for run in list(m):  # a run with results here: its "did not start" is stale
            if run in SYSTEM_RUNS and run_files(out_dir, f"{run}_") and \
                    str(m[run]).startswith("did not start"):
                del m[run]
    _update_json(out_dir / "notes.json", merge_notes)
    logger.info("merged %d run files from %s into %s", n, src, out_dir)
    return n


def _update_json(path: Path, update: Any) -> dict[str, Any]:
    data = json.loads(path.read_text()) if path.exists() else {}
    update(data)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=400)
    r = sub.add_parser("run")
    r.add_argument("--workloads", required=True, help="a directory written by `prepare`")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--load-format", default="auto")
    r.add_argument("--rates", default="2,4,8,16",
                   help="Poisson rates (req/s); 'inf' adds the unconstrained run (max throughput)")
    r.add_argument("--systems", default=",".join(SYSTEM_RUNS))
    r.add_argument("--port", type=int, default=31400)
    r.add_argument("--mem-fraction-static", type=float, default=MEM_FRACTION_STATIC,
                   help="every server's --mem-fraction-static (default %(default)s)")
    r.add_argument("--out-dir", default=None)
    r.add_argument("--timeout-s", type=float, default=1800)
    r.add_argument("--only-workloads", default="",
                   help="comma-separated workload names of --workloads to run (default: all)")
    r.add_argument("--duration-s", type=float, default=None,
                   help="replay about this many seconds of requests per rate (default: the "
                   "whole workload)")
    r.add_argument("--min-requests", type=int, default=20)
    r.add_argument("--warmup-requests", type=int, default=32,
                   help="replayed and discarded after each server start (0: none)")
    r.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    rp = sub.add_parser("report")
    rp.add_argument("--workloads", required=True)
    rp.add_argument("--out-dir", required=True)
    rp.add_argument("--merge-from", nargs="*", default=[],
                    help="device-call output directories to merge into --out-dir first")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(message)s")
    if a.cmd == "prepare":
        index = prepare(Path(a.out), a.num)
        print(json.dumps({k: v["summary"] for k, v in index.items()}, indent=1))
        return
    wl_dir = Path(a.workloads)
    index = json.loads((wl_dir / "workloads.json").read_text())
    if a.cmd == "report":
        for src in a.merge_from:
            merge_call(Path(src), Path(a.out_dir))
        write_merged_report(Path(a.out_dir), index)
        print((Path(a.out_dir) / "summary.md").read_text())
        return
    only = [w for w in a.only_workloads.split(",") if w]
    if set(only) - set(index):
        ap.error(f"unknown workloads {sorted(set(only) - set(index))}; known: {sorted(index)}")
    index = {w: m for w, m in index.items() if not only or w in only}
    rates = [float(x) for x in a.rates.split(",")]
    systems = [s for s in a.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEM_RUNS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; known: {sorted(SYSTEM_RUNS)}")
    plan = server_plan(systems, index, a.model_dir, a.load_format, a.port,
                       a.mem_fraction_static)
    if a.dry_run:
        for cmd, runs_of, group in plan:
            counts = {w: [requests_at(m, r, a.duration_s, a.min_requests) for r in rates]
                      for w, m in group.items()}
            print(f"{','.join(runs_of)}: {shlex.join(cmd[1:])} x {len(group)} workloads x "
                  f"rates {rates}: requests {counts}")
        return
    from benchmark.common import gpu_name, gpu_slug

    name = gpu_name()
    out_dir = Path(a.out_dir) if a.out_dir else Path(__file__).parent / "results" / gpu_slug(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmark.compare", *(argv or sys.argv[1:])])
    _update_json(out_dir / "meta.json", lambda m: m.update(
        gpu=m.get("gpu", name), model=f"{Path(a.model_dir).name} (load_format={a.load_format})",
        commands=[*m.get("commands", []), command]))
    for i, (cmd, runs_of, group) in enumerate(plan):
        why = run_system(runs_of, cmd, group, wl_dir, rates, a.port, out_dir, a.timeout_s,
                         a.duration_s, a.min_requests, a.warmup_requests)

        def note(n: dict, runs_of: Sequence[str] = runs_of, why: Optional[str] = why) -> None:
            for s in runs_of:  # a system that started drops an older "did not start"
                n.pop(s, None)
                if why:
                    n[s] = why
        _update_json(out_dir / "notes.json", note)
        if i + 1 < len(plan):  # the port and GPU memory free before the next server starts
            time.sleep(5)
    write_merged_report(out_dir, json.loads((wl_dir / "workloads.json").read_text()))
    print((out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
