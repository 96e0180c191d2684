"""How much of an ``inf`` run's TTFT is bench_serving's own: the client against a stub server.

    python -m benchmark.client_overhead --workloads .gpu/bench --num 400

Why: in ``benchmark.compare``'s ``inf`` runs (every request sent at once) no request got its
first token for 0.6-1.4 s on most servers and for 7.6-12.4 s on some stock SGLang runs of the
DeepSeek-V2-Lite shape. Here SGLang's ``bench_serving`` (the arguments ``benchmark.compare``
uses: the ``sglang-oai-chat`` backend, streaming, ``--flush-cache``) replays the same workload
file at ``inf`` against a local stub of the OpenAI chat endpoint that streams a few chunks the
moment a request arrives. Each request's TTFT is then the client's own dispatch delay: its
task started, its session opened, the request sent, the first chunk parsed. The stub is no
model server; it only times the client, on the machine this runs on.

Prints a table and writes ``benchmark/results/client_overhead_<label>.json`` (+ ``.png``: TTFT
per request in sending order); ``--label`` names the machine (default ``cpu``: the 2-core CI
machine; the GPU host has 16 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmark.common import RESULTS_DIR, print_table, run_bench_serving, write_result
from benchmark.workloads import openai_bench_args

logger = logging.getLogger(__name__)

ASSET_TOKENIZER = Path(__file__).resolve().parents[1] / "sglang_semipd" / "assets" \
    / "tokenizer-smollm2"
STUB_CHUNKS = 8  # streamed per request, at once


def _serve_stub(port: int) -> None:
    """A streaming OpenAI chat endpoint (plus what bench_serving asks for around a run) that
    answers at once; runs in its own process."""
    from aiohttp import web

    async def chat(request: Any) -> Any:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(min(int(body.get("max_completion_tokens") or 1), STUB_CHUNKS)):
            chunk = {"id": "stub", "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(_: Any) -> Any:
        return web.json_response({"data": [{"id": "stub"}]})

    async def ok(_: Any) -> Any:
        return web.Response(text="ok")

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models),
                    web.post("/flush_cache", ok), web.get("/health", ok)])
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def measure(workload: Path, num: int, tokenizer: Path = ASSET_TOKENIZER,
            timeout_s: float = 600.0) -> dict[str, Any]:
    """bench_serving at ``inf`` against the stub: per-request TTFTs (s) and the summary."""
    from sglang_semipd.testing.server import free_port

    port = free_port()
    stub = mp.get_context("spawn").Process(target=_serve_stub, args=(port,), daemon=True)
    stub.start()  # bench_serving itself waits (up to 60 s) for its /v1/models to answer
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.jsonl"
            args = [*openai_bench_args(workload, num, float("inf")),
                    "--model", str(tokenizer), "--tokenizer", str(tokenizer)]
            t0 = time.monotonic()
            _, command = run_bench_serving(port, args, out, Path(tmp) / "bench.log", timeout_s)
            wall = time.monotonic() - t0
            run = json.loads(out.read_text().splitlines()[-1])
    finally:
        stub.terminate()
        stub.join(10)
    ttfts = [float(x) for x in run["ttfts"]]
    ranked = sorted(ttfts)
    pick = lambda q: ranked[min(len(ranked) - 1, int(q * len(ranked)))]  # noqa: E731
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "workload": workload.name, "requests": len(ttfts), "completed": run["completed"],
            "command": command, "wall_s": wall, "duration_s": run["duration"],
            "ttft_min_s": ranked[0], "ttft_p50_s": pick(0.5), "ttft_p90_s": pick(0.9),
            "ttft_max_s": ranked[-1], "ttfts_s": ttfts}


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(result["ttfts_s"])), result["ttfts_s"], ".", markersize=3)
    ax.set_xlabel("request (sending order)")
    ax.set_ylabel("TTFT against an instant stub (s)")
    ax.set_title(f"bench_serving's own delay, {result['requests']} requests at inf, "
                 f"{result['cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", type=Path, default=Path(".gpu/bench"),
                    help="a benchmark.compare prepare directory")
    ap.add_argument("--workload", default="sharegpt")
    ap.add_argument("--num", type=int, default=400)
    ap.add_argument("--label", default="cpu", help="names the machine in the file name")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmark/results/client_overhead_<label>.json)")
    args = ap.parse_args(argv)
    result = measure(args.workloads / f"{args.workload}.jsonl", args.num)
    out = args.out or RESULTS_DIR / f"client_overhead_{args.label}.json"
    write_result(out, result)
    plot(result, out.with_suffix(".png"))
    print_table([(k, result[k]) for k in ("requests", "cpus", "ttft_min_s", "ttft_p50_s",
                                         "ttft_p90_s", "ttft_max_s", "duration_s")],
                "bench_serving against an instant stub (s)")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
