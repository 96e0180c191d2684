"""Semi-PD vs stock SGLang on the same GPU and model: greedy outputs and prompt logprobs.

  python -m benchmark.correctness --model-dir /tmp/models/tiny-bf16

Starts stock ``sglang.launch_server`` and then ``sglang_semipd.launch_server`` with the same
flags, sends the same prompts to each (concurrently: ``--concurrency``), and compares every
request's output token ids and prompt logprobs. Prompts: random token ids of mixed lengths,
a group sharing a long common prefix (radix hits) and a group longer than the chunked-prefill
size. Writes ``benchmark/results/correctness_<gpu>.json`` (keys: gpu, model, prompts,
token_identical, max_prompt_logprob_diff, command, plus details) and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmark.common import RESULTS_DIR, gpu_name, gpu_slug, print_table, write_result
from sglang_semipd.config import DETERMINISTIC_CHUNK_ALIGN
from sglang_semipd.testing.server import flush_cache, sse_events

CHUNK = 512
SERVE_FLAGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch",
               "--grammar-backend", "none", "--mem-fraction-static", "0.8",
               "--max-total-tokens", "100000", "--chunked-prefill-size", str(CHUNK),
               "--cuda-graph-max-bs-decode", "32", "--disable-prefill-cuda-graph"]
TRUNCATION_ALIGN_ENV = DETERMINISTIC_CHUNK_ALIGN["triton"][0]


def server_env(extra_flags: list[str]) -> dict[str, str]:
    """Environment for both servers. Under ``--enable-deterministic-inference`` with triton
    attention, SGLang 0.5.17 aligns chunked-prefill boundaries to
    ``$SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE`` (default 4096) and never schedules a
    chunk shorter than that (``PrefillAdder.add_one_req``): with this run's 512-token chunk
    every prompt longer than a chunk would wait for ever, on stock and semi-PD alike. Both
    servers get the chunk size as the alignment (unless the caller set it)."""
    env = dict(os.environ)
    if "--enable-deterministic-inference" in extra_flags:
        env.setdefault(TRUNCATION_ALIGN_ENV, str(CHUNK))
    return env


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--port", type=int, default=31300)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--extra-flags", default="",
                    help="more server flags for both servers, e.g. "
                         "'--enable-deterministic-inference' (SGLang's batch-invariant kernels)")
    ap.add_argument("--only", choices=["stock", "semipd"], default=None,
                    help="run one server only (smoke test; no comparison)")
    return ap.parse_args()


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(100, 49000) for _ in range(k)]  # noqa: E731
    shared = tok(300)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(shared + tok(rng.randrange(1, 60)))  # radix hit on 300 tokens
        elif kind == 1:
            out.append(tok(rng.randrange(600, 1500)))  # longer than the 512 chunk
        else:
            out.append(tok(rng.randrange(4, 400)))
    return out


def query(url: str, ids: list[int], max_new: int) -> dict[str, Any]:
    from sglang_semipd.testing.server import http_json

    out = http_json(url + "/generate", {
        "input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new}}, timeout=120)
    meta = out["meta_info"]
    return {"output_ids": out["output_ids"],
            "prompt_logprobs": [x[0] for x in meta["input_token_logprobs"]],
            "finish": meta.get("finish_reason")}


def run_server(module_args: list[str], a: argparse.Namespace, name: str,
               prompts: list[list[int]], log_dir: Path) -> tuple[list[dict], dict]:
    from sglang_semipd.testing.server import ServerProcess, http_json

    extra = shlex.split(a.extra_flags)
    cmd = [sys.executable, "-m", *module_args, "--model-path", a.model_dir,
           "--port", str(a.port), *SERVE_FLAGS, *extra]
    env = server_env(extra)
    with ServerProcess(cmd, a.port, log_dir / f"server_{name}.log", start_timeout=420,
                       env=env) as s:
        first = query(s.url, prompts[0], a.max_new_tokens)  # warm
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(a.concurrency) as pool:
            results = list(pool.map(lambda p: query(s.url, p, a.max_new_tokens), prompts))
        elapsed = time.monotonic() - t0
        sequential = [query(s.url, p, a.max_new_tokens) for p in prompts[:16]]
        chat = http_json(s.url + "/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 8, "temperature": 0})
        flush_cache(s.url, timeout=60)
        stream_ok = _stream_matches(s.url, prompts[1], a.max_new_tokens, first_ids=None)
        info = {"startup_s": s.startup_s, "concurrent_s": elapsed, "warm": first,
                "sequential": sequential, "chat": chat, "stream_matches_nonstream": stream_ok,
                "command": shlex.join(["python", "-m", *cmd[2:]]),
                "env": {k: env[k] for k in (TRUNCATION_ALIGN_ENV,) if k in env}}
    return results, info


def _stream_matches(url: str, ids: list[int], max_new: int, first_ids: Any) -> bool:
    """Streamed /generate yields the same ids as the non-streamed one (both from an empty
    prefix cache)."""
    import json
    import urllib.request

    body = json.dumps({"input_ids": ids, "stream": True,
                       "sampling_params": {"temperature": 0, "max_new_tokens": max_new}})
    req = urllib.request.Request(url + "/generate", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    last = None
    with urllib.request.urlopen(req, timeout=300) as resp:
        for last in sse_events(resp):
            pass
    flush_cache(url, timeout=60)  # from scratch again: a radix hit changes bf16 numerics
    plain = query(url, ids, max_new)["output_ids"]
    return last is not None and last["output_ids"] == plain


def model_dtype(model_dir: str) -> str:
    """The checkpoint's ``torch_dtype`` (what both servers serve unless ``--dtype`` says
    otherwise)."""
    import json

    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("torch_dtype", "?")
    except (OSError, ValueError):
        return "?"


def main() -> None:
    a = parse()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(message)s")
    log_dir = Path(a.log_dir or tempfile.mkdtemp(prefix="correctness_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(a.prompts)
    runs = {}
    for name, module in (("stock", ["sglang.launch_server"]),
                         ("semipd", ["sglang_semipd.launch_server"])):
        if a.only and a.only != name:
            continue
        runs[name] = run_server(module, a, name, prompts, log_dir)
        time.sleep(3)
    if a.only:
        results, info = runs[a.only]
        print_table([("server", a.only), ("startup s", info["startup_s"]),
                     ("requests ok", len(results)),
                     ("stream == non-stream", info["stream_matches_nonstream"])], "smoke")
        return
    (sr, si), (pr, pi) = runs["stock"], runs["semipd"]
    same = sum(x["output_ids"] == y["output_ids"] for x, y in zip(sr, pr))
    same_seq = sum(x["output_ids"] == y["output_ids"]
                   for x, y in zip(si["sequential"], pi["sequential"]))
    diff = max(abs(u - v) for x, y in zip(sr, pr)
               for u, v in zip(x["prompt_logprobs"][1:], y["prompt_logprobs"][1:]))
    name = gpu_name()
    record = {
        "gpu": name, "model": f"{a.model_dir} ({model_dtype(a.model_dir)})",
        "prompts": len(prompts), "token_identical": same,
        "token_identical_sequential": f"{same_seq}/{len(si['sequential'])}",
        "max_prompt_logprob_diff": diff, "max_new_tokens": a.max_new_tokens,
        "concurrency": a.concurrency, "serve_flags": SERVE_FLAGS + shlex.split(a.extra_flags),
        "command": shlex.join(["python", "-m", "benchmark.correctness", *sys.argv[1:]]),
        "stock": {k: v for k, v in si.items() if k not in ("sequential", "warm")},
        "semipd": {k: v for k, v in pi.items() if k not in ("sequential", "warm")},
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(a.out) if a.out else RESULTS_DIR / f"correctness_{gpu_slug(name)}.json"
    write_result(out, record)
    print_table([("prompts", len(prompts)), ("token identical (concurrent)", same),
                 ("token identical (sequential, first 16)", record["token_identical_sequential"]),
                 ("max |prompt logprob diff|", diff),
                 ("stream == non-stream (stock / semi-PD)",
                  f"{si['stream_matches_nonstream']} / {pi['stream_matches_nonstream']}")],
                f"correctness, {name}")


if __name__ == "__main__":
    main()
