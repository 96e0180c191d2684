"""Stock SGLang baseline on this GPU: serve a model, run bench_serving, record the numbers.

  python -m benchmark.baseline_sglang --model-dir /tmp/models/llama8b --load-format dummy \
      --dataset-path /tmp/models/sharegpt_synth.json

Writes ``benchmark/results/baseline_sglang_<gpu>.json`` (or ``--out``) with the keys
gpu, command, model, request_throughput, output_throughput_tok_s, median_ttft_ms,
median_tpot_ms, plus the server command, start-up time and the full bench_serving record.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path

from benchmark.common import (RESULTS_DIR, gpu_name, gpu_slug, print_table,
                              run_bench_serving, write_result)
from sglang_semipd.testing.server import ServerProcess

SERVE_FLAGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch",
               "--grammar-backend", "none", "--mem-fraction-static", "0.8"]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dataset-path", required=True, help="ShareGPT-format JSON (text source)")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--request-rate", default="inf")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--extra-server-args", default="", help="appended to the server command")
    return ap.parse_args()


def main() -> None:
    a = parse()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    log_dir = Path(a.log_dir or tempfile.mkdtemp(prefix="baseline_"))
    server_cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", a.model_dir,
                  "--load-format", a.load_format, "--port", str(a.port), *SERVE_FLAGS,
                  *shlex.split(a.extra_server_args)]
    bench_args = ["--dataset-name", "random", "--dataset-path", a.dataset_path,
                  "--num-prompts", str(a.num_prompts), "--random-input-len", str(a.input_len),
                  "--random-output-len", str(a.output_len), "--random-range-ratio", "1.0",
                  "--request-rate", a.request_rate, "--seed", "1"]
    with ServerProcess(server_cmd, a.port, log_dir / "server_baseline.log") as server:
        result, bench_cmd = run_bench_serving(a.port, bench_args, log_dir / "bench.jsonl",
                                              log_dir / "bench_baseline.log", timeout_s=900)
    name = gpu_name()
    record = {
        "gpu": name, "model": f"{a.model_dir} (load_format={a.load_format})",
        "command": shlex.join(["python", "-m", "benchmark.baseline_sglang", *sys.argv[1:]]),
        "bench_command": bench_cmd,
        "server_command": shlex.join(["python", "-m", "sglang.launch_server", *server_cmd[3:]]),
        "server_startup_s": server.startup_s,
        "request_throughput": result["request_throughput"],
        "output_throughput_tok_s": result["output_throughput"],
        "median_ttft_ms": result["median_ttft_ms"],
        "median_tpot_ms": result["median_tpot_ms"],
        "bench_serving": {k: v for k, v in result.items() if k != "server_info"},
    }
    out = Path(a.out) if a.out else RESULTS_DIR / f"baseline_sglang_{gpu_slug(name)}.json"
    write_result(out, record)
    print_table([(k, record[k]) for k in ("gpu", "request_throughput", "output_throughput_tok_s",
                                          "median_ttft_ms", "median_tpot_ms", "server_startup_s")],
                "stock SGLang baseline")


if __name__ == "__main__":
    main()
