"""SM partitioning on one GPU: resize latency, prefill/decode isolation, graph confinement.

    python -m benchmark.sm_partition --model-dir /tmp/models/llama8b --load-format dummy

(a) resize latency: the semi-PD server (``--sm-partition green``; ``mps``: a standby worker
    pair per resize, see ``measure_mps_resizes``) under a decode load is
    resized through ``/set_internal_state`` many times; the scheduler's trace
    (``SGLANG_SEMIPD_TRACE``) gives, per worker acknowledgement, the time from the command to
    the switch at the worker's next iteration boundary.
(b) isolation: per split (and for ``--sm-partition none``), ``--batch`` requests decode while
    (1) nothing else runs, (2) the prefill worker runs back-to-back ``--prefill-len``-token
    prefills; then (3) prefills run alone. Decode step times and prefill tokens/s come from
    the workers' per-iteration trace records.
(c) graph confinement: a GEMM CUDA graph captured on a green split's stream and replayed there,
    against eager work on that split and a graph captured on an ordinary stream
    (:func:`sglang_semipd.testing.sm_probe.graph_confinement`, in a child process).

Prints a table and writes ``benchmark/results/sm_partition_<gpu>.json`` (+ ``.png``).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from benchmark.common import RESULTS_DIR, gpu_name, gpu_slug, print_table, write_result
from sglang_semipd.testing.server import ServerProcess, http_json, python_module_cmd
from sglang_semipd.trace import read_trace

logger = logging.getLogger(__name__)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--shares", default="0.2,0.35,0.5,0.65,0.8")
    ap.add_argument("--modes", default="green,none")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--phase-s", type=float, default=3.0)
    ap.add_argument("--resizes", type=int, default=40)
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--port", type=int, default=31300)
    ap.add_argument("--log-dir", default="/tmp/semipd-logs")
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def _confinement_child(conn: Any) -> None:
    try:
        from sglang_semipd.testing.sm_probe import graph_confinement

        conn.send(graph_confinement(0, share=0.25))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send({"error": repr(exc)})


def measure_confinement() -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_confinement_child, args=(writer,))
    proc.start()
    out = reader.recv() if reader.poll(300) else {"error": "no answer in 300 s"}
    proc.join(30)
    return out


class Load:
    """Background request generators against one server."""

    def __init__(self, url: str, vocab: int = 30000, seed: int = 0) -> None:
        self.url, self.vocab = url, vocab
        self.rng = random.Random(seed)
        self.stop = threading.Event()

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(100, self.vocab) for _ in range(n)]

    def decode_batch(self, pool: ThreadPoolExecutor, batch: int, max_new: int) -> list[Any]:
        return [pool.submit(self._gen, self.ids(16), max_new) for _ in range(batch)]

    def prefill_flood(self, pool: ThreadPoolExecutor, length: int, inflight: int = 2
                      ) -> list[Any]:
        def loop() -> int:
            n = 0
            while not self.stop.is_set():
                self._gen(self.ids(length), 1)
                n += 1
            return n
        return [pool.submit(loop) for _ in range(inflight)]

    def _gen(self, ids: list[int], max_new: int) -> Any:
        try:
            return http_json(self.url + "/generate", {"input_ids": ids, "sampling_params": {
                "temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}},
                timeout=600)
        except Exception as exc:  # noqa: BLE001 - aborted requests end here
            return {"error": repr(exc)}


def abort_all(url: str) -> None:
    try:
        http_json(url + "/abort_request", {"rid": "", "abort_all": True}, timeout=30)
    except Exception as exc:  # noqa: BLE001
        logger.warning("abort_all failed: %s", exc)


def resize(url: str, share: float) -> None:
    out = http_json(url + "/set_internal_state",
                    {"server_args": {"semipd_prefill_sm_share": share}})
    if out != [True]:
        raise RuntimeError(f"resize to {share} refused: {out}")


def wait_split(trace: Path, seq: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(1 for r in read_trace(trace) if r["kind"] == "resize_ack" and r["seq"] >= seq) >= 2:
            return
        time.sleep(0.05)
    raise TimeoutError(f"resize {seq} not acknowledged")


def window(rows: list[dict], role: str, t0: float, t1: float, min_bs: int = 1) -> list[dict]:
    return [r for r in rows if r["kind"] == "iteration" and r["role"] == role
            and t0 <= r["start"] and r["end"] <= t1 and r["batch_size"] >= min_bs]


def decode_ms(rows: list[dict]) -> Optional[float]:
    return statistics.median((r["end"] - r["start"]) * 1e3 for r in rows) if rows else None


def prefill_tok_s(rows: list[dict], t0: float, t1: float) -> Optional[float]:
    return sum(r["tokens"] for r in rows) / (t1 - t0) if rows else None


def measure_split(url: str, trace: Path, a: argparse.Namespace, share: Optional[float]
                  ) -> dict[str, Any]:
    load = Load(url, seed=int((share or 0) * 1000))
    min_bs = int(a.batch * 0.9)
    with ThreadPoolExecutor(a.batch + 4) as pool:
        futs = load.decode_batch(pool, a.batch, max_new=2000)
        time.sleep(3.0)  # all prefilled, decoding at full batch
        t0 = time.monotonic()
        time.sleep(a.phase_s)
        t1 = time.monotonic()
        flood = load.prefill_flood(pool, a.prefill_len)
        time.sleep(1.0)
        t2 = time.monotonic()
        time.sleep(a.phase_s)
        t3 = time.monotonic()
        abort_all(url)  # decode batch ends; the flood goes on alone
        for f in futs:
            f.result()
        time.sleep(1.0)
        t4 = time.monotonic()
        time.sleep(a.phase_s)
        t5 = time.monotonic()
        load.stop.set()
        for f in flood:
            f.result()
    time.sleep(1.0)
    rows = read_trace(trace)
    alone = window(rows, "decode", t0, t1, min_bs)
    mixed = window(rows, "decode", t2, t3, min_bs)
    pre_mixed = window(rows, "prefill", t2, t3)
    pre_alone = window(rows, "prefill", t4, t5)
    return {"mode": a.current_mode, "prefill_share": share, "decode_alone_step_ms": decode_ms(alone),
            "decode_step_ms": decode_ms(mixed), "decode_iterations": len(mixed),
            "prefill_tok_s": prefill_tok_s(pre_mixed, t2, t3),
            "prefill_alone_tok_s": prefill_tok_s(pre_alone, t4, t5),
            "prefill_iterations": len(pre_mixed)}


def measure_resizes(url: str, trace: Path, a: argparse.Namespace, shares: list[float]
                    ) -> dict[str, Any]:
    load = Load(url, seed=7)
    with ThreadPoolExecutor(a.batch + 2) as pool:
        futs = load.decode_batch(pool, a.batch, max_new=2000)
        time.sleep(3.0)
        first = max([r["seq"] for r in read_trace(trace) if r["kind"] == "resize"] or [0])
        for i in range(a.resizes):
            resize(url, shares[i % len(shares)])
            time.sleep(0.1)
        time.sleep(1.0)
        abort_all(url)
        for f in futs:
            f.result()
    return latency_summary([r["latency_ms"] for r in read_trace(trace)
                            if r["kind"] == "resize_ack" and r["seq"] > first
                            and r.get("latency_ms") is not None])


def latency_summary(samples: list[float]) -> dict[str, Any]:
    """``p50`` (the upper median), ``p99``, ``max`` and ``n`` of resize latencies (ms)."""
    lat = sorted(samples)
    if not lat:
        return {"p50": None, "p99": None, "n": 0}
    return {"p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "max": lat[-1], "n": len(lat)}


def measure_mps_resizes(url: str, trace: Path, a: argparse.Namespace, shares: list[float],
                        n: int = 2, timeout_s: float = 300.0) -> dict[str, Any]:
    """``--sm-partition mps``: each resize starts a standby worker pair and swaps it in
    (``standby_swap`` in the trace: command -> new requests served by the new pair); the old
    pair finishes its decode load first and retires (``retired``; ``None`` in
    ``retire_after_swap_s`` when it had not within ``timeout_s``); every sample is kept."""
    load = Load(url, seed=11)
    swaps: list[float] = []
    retire_s: list[float] = []
    with ThreadPoolExecutor(a.batch + 2) as pool:
        for i in range(n):
            futs = load.decode_batch(pool, a.batch, max_new=300)
            time.sleep(2.0)
            before = len([r for r in read_trace(trace) if r["kind"] == "standby_swap"])
            resize(url, shares[(i + 1) % len(shares)] if i % 2 == 0 else shares[0])
            deadline = time.monotonic() + timeout_s
            swap = None
            while time.monotonic() < deadline and swap is None:
                rows = [r for r in read_trace(trace) if r["kind"] == "standby_swap"]
                swap = rows[before] if len(rows) > before else None
                time.sleep(0.5)
            if swap is None:
                raise TimeoutError("mps resize: no swap")
            swaps.append(swap["latency_ms"])
            for f in futs:
                f.result()
            retired = None  # stays None when the old pair did not retire before the deadline
            while time.monotonic() < deadline and retired is None:
                done = [r for r in read_trace(trace) if r["kind"] == "retired"
                        and r["generation"] == swap["generation"] - 1]
                if done:
                    retired = done[0]["t"] - swap["t"]
                time.sleep(0.5)
            retire_s.append(retired)
    return {**latency_summary(swaps), "samples_ms": swaps, "retire_after_swap_s": retire_s,
            "what": "command -> standby pair serving new requests (worker start included)"}


def server_cmd(a: argparse.Namespace, mode: str, shares: list[float]) -> list[str]:
    return python_module_cmd(
        "sglang_semipd.launch_server", "--model-path", a.model_dir, "--port", str(a.port),
        "--load-format", a.load_format, "--attention-backend", "triton",
        "--sampling-backend", "pytorch", "--grammar-backend", "none",
        "--mem-fraction-static", str(a.mem_fraction_static),
        "--chunked-prefill-size", str(a.prefill_len), "--max-running-requests",
        str(a.batch + 8), "--cuda-graph-max-bs-decode", str(a.batch),
        "--disable-radix-cache", "--sm-partition", mode,
        "--sm-splits", ",".join(map(str, shares)), "--prefill-sm-share", "0.5",
        "--partition-policy", "static")


def run_mode(a: argparse.Namespace, mode: str, shares: list[float], log_dir: Path
             ) -> dict[str, Any]:
    trace = log_dir / f"trace_{mode}.jsonl"
    trace.unlink(missing_ok=True)
    env = dict(os.environ, SGLANG_SEMIPD_TRACE=str(trace))
    out: dict[str, Any] = {"isolation": [], "resize_ms": None}
    a.current_mode = mode
    with ServerProcess(server_cmd(a, mode, shares), a.port, log_dir / f"server_{mode}.log",
                       start_timeout=600, env=env) as s:
        out["startup_s"] = s.startup_s
        if mode == "green":
            seq = 0
            for share in shares:
                resize(s.url, share)
                seq = max([r["seq"] for r in read_trace(trace) if r["kind"] == "resize"] or [0])
                wait_split(trace, seq)
                out["isolation"].append(measure_split(s.url, trace, a, share))
                logger.info("green %.2f: %s", share, out["isolation"][-1])
            out["resize_ms"] = measure_resizes(s.url, trace, a, shares)
        else:
            out["isolation"].append(dict(measure_split(s.url, trace, a, None), mode=mode))
            logger.info("%s: %s", mode, out["isolation"][-1])
            if mode == "mps":
                out["resize_ms"] = measure_mps_resizes(s.url, trace, a, shares)
    return out


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["isolation"] if r["prefill_share"] is not None]
    none = [r for r in record["isolation"] if r["prefill_share"] is None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["prefill_share"] for r in rows]
    ax1.plot(x, [r["decode_step_ms"] for r in rows], "o-", label="decode + 8K prefills")
    ax1.plot(x, [r["decode_alone_step_ms"] for r in rows], "s--", label="decode alone")
    colors = {"none": "gray", "mps": "tab:red"}  # one-split modes, told apart
    for r in none:
        ax1.axhline(r["decode_step_ms"] or 0, color=colors.get(r.get("mode", "none"), "k"),
                    ls=":", label=f"{r.get('mode', 'none')} (one split)")
    ax1.set_xlabel("prefill SM share")
    ax1.set_ylabel(f"decode step (ms), batch {record['batch']}")
    ax1.legend()
    ax2.plot(x, [r["prefill_tok_s"] for r in rows], "o-", label="with decode running")
    ax2.plot(x, [r["prefill_alone_tok_s"] for r in rows], "s--", label="prefill alone")
    for r in none:
        ax2.axhline(r["prefill_tok_s"] or 0, color=colors.get(r.get("mode", "none"), "k"),
                    ls=":", label=r.get("mode", "none"))
    ax2.set_xlabel("prefill SM share")
    ax2.set_ylabel("prefill tokens/s")
    ax2.legend()
    fig.suptitle(f"semi-PD SM partition on {record['gpu']} ({record['model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    a = parse()
    shares = [float(x) for x in a.shares.split(",")]
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    gpu = gpu_name()
    record: dict[str, Any] = {
        "gpu": gpu, "model": Path(a.model_dir).name, "batch": a.batch,
        "prefill_len": a.prefill_len, "isolation": [], "resize_ms": {},
        "command": "python -m benchmark.sm_partition " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None)}
    conf = measure_confinement()
    record["graph_confinement"] = conf
    record["graph_replay_confined"] = bool(conf.get("confined"))
    logger.info("graph confinement: %s", conf)
    for mode in a.modes.split(","):
        try:
            res = run_mode(a, mode, shares, log_dir)
        except Exception as exc:  # noqa: BLE001 - recorded, the other modes still run
            logger.exception("mode %s failed", mode)
            record.setdefault("errors", {})[mode] = repr(exc)[:2000]
            continue
        record["isolation"] += res["isolation"]
        record["resize_ms"][mode] = res["resize_ms"]
        record.setdefault("startup_s", {})[mode] = res["startup_s"]
    record["resize_ms"].setdefault("none", None)  # no resize: one split
    record.setdefault("notes", []).append(
        "mps: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per worker, isolation measured at the start "
        "share 0.5; its resize starts a standby worker pair, so resize_ms includes worker "
        "start-up")
    out = Path(a.out) if a.out else RESULTS_DIR / f"sm_partition_{gpu_slug(gpu)}.json"
    write_result(out, record)
    try:
        plot(record, out.with_suffix(".png"))
    except Exception as exc:  # noqa: BLE001 - the JSON is the record
        logger.warning("plot failed: %s", exc)
    rows = [(f"{r['prefill_share'] if r['prefill_share'] is not None else r.get('mode', 'none')}",
             f"decode {r['decode_step_ms']} ms (alone {r['decode_alone_step_ms']}), "
             f"prefill {r['prefill_tok_s']} tok/s (alone {r['prefill_alone_tok_s']})")
            for r in record["isolation"]]
    rows.append(("resize_ms green", record["resize_ms"].get("green")))
    rows.append(("resize_ms mps", record["resize_ms"].get("mps")))
    rows.append(("graph_replay_confined", record["graph_replay_confined"]))
    print_table(rows, f"SM partition on {gpu}")


if __name__ == "__main__":
    main()
