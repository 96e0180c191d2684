"""Soak the semi-PD server: many requests at high load with random aborts, then check at idle
that nothing leaked.

    python -m benchmark.soak --model-dir /tmp/models/tiny-bf16 --requests 20000

Requests: random prompt lengths, a quarter of them behind one of a few shared prefixes (radix
hits), half streamed; ``--abort-frac`` of them aborted at a random moment -- streamed ones by
closing the connection mid-stream (a client disconnect), the others through ``/abort_request``
with their ``rid`` -- every other request must come back with exactly ``max_new_tokens`` tokens
(``ignore_eos``). At idle the memory manager's full invariant report (``/server_info`` ->
``internal_states[0].semipd.pool``, after a cache flush) must hold exactly: no slot held by a
client beyond its open lease, no request row held, no radix lock ref.

Writes ``benchmark/results/soak_<gpu>.json`` with ``gpu``, ``requests``, ``aborted``,
``completed_full``, ``errors``, ``leaked_slots``, ``lock_refs_left``, ``command``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmark.common import RESULTS_DIR, gpu_name, gpu_slug, print_table, write_result
from sglang_semipd.testing.server import (ServerProcess, http_json, pool_leaks, python_module_cmd,
                                          semipd_pool_report, sse_events)

logger = logging.getLogger(__name__)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--abort-frac", type=float, default=0.1)
    ap.add_argument("--max-input", type=int, default=1500)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="a request with no answer this long counts as an error (a lost "
                    "request), so a soak always ends with a record")
    ap.add_argument("--port", type=int, default=31500)
    ap.add_argument("--server-args", default="--attention-backend triton --sampling-backend "
                    "pytorch --grammar-backend none --mem-fraction-static 0.8 "
                    "--max-total-tokens 200000 --cuda-graph-max-bs-decode 64 --enable-metrics")
    ap.add_argument("--log-dir", default="/tmp/semipd-logs")
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def plan(a: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(a.seed)
    prefixes = [[rng.randrange(100, 30000) for _ in range(rng.randrange(200, 600))]
                for _ in range(8)]
    out = []
    for i in range(a.requests):
        ids = [rng.randrange(100, 30000) for _ in range(rng.randrange(1, a.max_input))]
        if rng.random() < 0.25:
            ids = rng.choice(prefixes) + ids[:200]
        out.append({"rid": f"soak-{a.seed}-{i}", "ids": ids,
                    "max_new": rng.randrange(1, a.max_output + 1),
                    "stream": rng.random() < 0.5,
                    "abort_after_s": rng.uniform(0.0, 1.5) if rng.random() < a.abort_frac
                    else None})
    return out


def run_one(url: str, r: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    body = json.dumps({"rid": r["rid"], "input_ids": r["ids"], "stream": r["stream"],
                       "sampling_params": {"temperature": 0, "max_new_tokens": r["max_new"],
                                           "ignore_eos": True}}).encode()
    req = urllib.request.Request(url + "/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    abort_after = r["abort_after_s"]
    timer = None
    if abort_after is not None and not r["stream"]:
        timer = threading.Timer(abort_after, lambda: http_json(
            url + "/abort_request", {"rid": r["rid"]}, timeout=30))
        timer.start()
    t0 = time.monotonic()
    tokens, finish = 0, None
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            if not r["stream"]:
                out = json.loads(resp.read())
                tokens = out["meta_info"]["completion_tokens"]
                finish = (out["meta_info"].get("finish_reason") or {}).get("type")
            else:
                for chunk in sse_events(resp):
                    tokens = chunk["meta_info"]["completion_tokens"]
                    finish = (chunk["meta_info"].get("finish_reason") or {}).get("type")
                    if abort_after is not None and time.monotonic() - t0 > abort_after:
                        return {"aborted": True, "tokens": tokens}  # disconnect
    except Exception as exc:  # noqa: BLE001
        # no answer in time is a lost request, aborted or not (an abort must be answered too)
        lost = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None),
                                                           TimeoutError)
        if abort_after is not None and not lost:
            return {"aborted": True, "tokens": tokens, "note": repr(exc)[:200]}
        return {"error": repr(exc)[:500], "rid": r["rid"], "stream": r["stream"],
                "abort_requested": abort_after is not None, "lost": lost}
    finally:
        if timer is not None:
            timer.cancel()
    if abort_after is not None and finish == "abort":
        return {"aborted": True, "tokens": tokens}
    return {"tokens": tokens, "full": tokens == r["max_new"], "finish": finish,
            "aborted_requested": abort_after is not None}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    a = parse()
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    reqs = plan(a)
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", a.model_dir,
                            "--load-format", a.load_format, "--port", str(a.port),
                            *a.server_args.split())
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with ServerProcess(cmd, a.port, log_dir / "server_soak.log", start_timeout=600) as s:
        with ThreadPoolExecutor(a.concurrency) as pool:
            for k, res in enumerate(pool.map(lambda r: run_one(s.url, r, a.request_timeout),
                                             reqs)):
                results.append(res)
                if (k + 1) % 1000 == 0:
                    logger.info("%d/%d requests done", k + 1, len(reqs))
        elapsed = time.monotonic() - t0
        time.sleep(2.0)
        report = semipd_pool_report(s.url)
    aborted = sum(1 for r in results if r.get("aborted"))
    finished = [r for r in results if "full" in r]
    errors = sum(1 for r in results if "error" in r)
    record = {
        "gpu": gpu_name(), "model": Path(a.model_dir).name, "requests": len(results),
        "aborted": aborted, "completed": len(finished),
        "completed_full": sum(1 for r in finished if r["full"]),
        "completed_short": sum(1 for r in finished if not r["full"]
                               and not r["aborted_requested"]),
        "errors": errors,
        "lost": sum(1 for r in results if r.get("lost")),
        "error_samples": [r for r in results if "error" in r][:20],
        **pool_leaks(report),
        "invariant_ok": report["ok"], "pool": report, "elapsed_s": elapsed,
        "command": "python -m benchmark.soak " + " ".join(
            f"--{k.replace('_', '-')} {v!r}" if k == "server_args" else
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None)}
    out = Path(a.out) if a.out else RESULTS_DIR / f"soak_{gpu_slug(record['gpu'])}.json"
    write_result(out, record)
    print_table([(k, record[k]) for k in ("requests", "aborted", "completed",
                                           "completed_full", "completed_short", "errors", "lost",
                                           "leaked_slots", "lock_refs_left", "req_rows_left",
                                           "invariant_ok", "elapsed_s")],
                f"soak on {record['gpu']}")


if __name__ == "__main__":
    main()
