"""Unified storage on this GPU: one copy of the weights and one KV pool for two workers.

  python -m benchmark.unified_storage --model-dir /tmp/models/llama3.1-8b --load-format dummy

Same run, same GPU, same SGLang settings: (1) semi-PD's memory manager plus a prefill worker
(eager) and a decode worker (CUDA graphs) attached to it, with one request through each (the
decode worker reuses the prefix the prefill worker wrote); (2) stock ``sglang.launch_server``
serving the same model. Records device memory in use (nvidia-smi, minus what was in use
before) after each is up, and counts weight copies from allocations: the manager's weight
bytes plus every worker's *locally allocated* weight bytes (storages inside its own CUDA
caching-allocator segments), over the weight bytes.

Writes ``benchmark/results/unified_storage_<gpu>.json`` (keys: gpu, model, weights_bytes,
kv_pool_tokens, gpu_mem_semipd_bytes, gpu_mem_sglang_bytes, weight_copies, command, plus
details) and a PNG bar chart next to it; prints a table.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmark.common import RESULTS_DIR, gpu_name, gpu_slug, print_table, write_result

logger = logging.getLogger(__name__)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--max-total-tokens", type=int, default=200_000,
                    help="same KV pool size on both sides (0: each side's own sizing)")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=16)
    ap.add_argument("--port", type=int, default=31200)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def gpu_used_bytes() -> int:
    """Device memory in use (all processes), from nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                          "nounits", "-i", "0"], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[0]) << 20


def per_process_mib() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()


def sglang_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    kw = dict(model_path=a.model_dir, load_format=a.load_format, attention_backend="triton",
              sampling_backend="pytorch", grammar_backend="none",
              mem_fraction_static=a.mem_fraction_static,
              cuda_graph_max_bs_decode=a.cuda_graph_max_bs, disable_prefill_cuda_graph=True)
    if a.max_total_tokens:
        kw["max_total_tokens"] = a.max_total_tokens
    return kw


def to_cli(kw: dict[str, Any]) -> list[str]:
    """ServerArgs keyword arguments as launch_server flags (``True`` = a bare switch)."""
    out: list[str] = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def measure_semipd(kw: dict[str, Any], log_dir: Path, idle: int) -> dict[str, Any]:
    import random

    from sglang.srt.server_args import ServerArgs

    from sglang_semipd.testing.unified import UnifiedStack

    workers = {"prefill": {"role": "prefill"}, "decode": {"role": "decode", "cuda_graphs": True}}
    t0 = time.monotonic()
    with UnifiedStack(ServerArgs(**kw), tempfile.mkdtemp(prefix="semipd-us-"), workers) as s:
        startup = time.monotonic() - t0
        rng = random.Random(0)
        p = [rng.randrange(100, 30000) for _ in range(64)]
        q = [rng.randrange(100, 30000) for _ in range(16)]
        s.call("prefill", "run", p, True, 0)
        got = s.call("decode", "run", p + q, True, 8)
        used = gpu_used_bytes() - idle
        procs = per_process_mib()
        report = s.call("decode", "stats")["report"]
    m, reps = s.manager, s.reports
    local = {n: r["local_weight_bytes"] for n, r in reps.items()}
    return {"startup_s": startup, "gpu_mem_bytes": used, "per_process_mib": procs,
            "weights_bytes": m["weights_bytes"], "kv_pool_tokens": m["max_total_num_tokens"],
            "kv_pool_bytes": m["kv_pool_bytes"], "manager": m, "workers": reps,
            "worker_local_weight_bytes": local,
            "weight_copies": (m["weights_bytes"] + sum(local.values())) / m["weights_bytes"],
            "decode_reused_prefix_tokens": got["prefix_len"], "invariant_ok": report.ok,
            "exit_codes": s.exit_codes}


def measure_stock(kw: dict[str, Any], port: int, log_dir: Path, idle: int
                  ) -> tuple[dict[str, Any], str]:
    from sglang_semipd.testing.server import ServerProcess, http_json

    cmd = [sys.executable, "-m", "sglang.launch_server", *to_cli(kw), "--port", str(port)]
    with ServerProcess(cmd, port, log_dir / "server_stock.log", start_timeout=400) as srv:
        http_json(srv.url + "/generate", {"input_ids": list(range(100, 180)),
                                          "sampling_params": {"temperature": 0,
                                                              "max_new_tokens": 8}})
        used = gpu_used_bytes() - idle
        info = http_json(srv.url + "/get_server_info")
        procs = per_process_mib()
        startup = srv.startup_s
    tokens = info.get("max_total_num_tokens")
    if tokens is None:
        tokens = (info.get("internal_states") or [{}])[0].get("max_total_num_tokens")
    return ({"startup_s": startup, "gpu_mem_bytes": used, "per_process_mib": procs,
             "kv_pool_tokens": tokens},
            shlex.join(["python", "-m", "sglang.launch_server", *cmd[3:]]))


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    fig, ax = plt.subplots(figsize=(5, 4))
    names = ["stock SGLang", "semi-PD (MM + 2 workers)"]
    vals = [record["gpu_mem_sglang_bytes"] / gib, record["gpu_mem_semipd_bytes"] / gib]
    ax.bar(names, vals, color=["#888888", "#2a7ab0"])
    ax.axhline(record["weights_bytes"] / gib, color="k", ls="--", lw=1, label="one weight copy")
    ax.set_ylabel("GPU memory in use (GiB)")
    ax.set_title(f"{record['model_short']} on {record['gpu_slug']}, "
                 f"mem-fraction-static {record['mem_fraction_static']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    a = parse()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(message)s")
    log_dir = Path(a.log_dir or tempfile.mkdtemp(prefix="unified_storage_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    kw = sglang_kwargs(a)
    idle = gpu_used_bytes()
    semipd = measure_semipd(kw, log_dir, idle)
    time.sleep(3)
    idle_after = gpu_used_bytes()
    stock, stock_cmd = measure_stock(kw, a.port, log_dir, idle_after)
    name = gpu_name()
    record = {
        "gpu": name, "gpu_slug": gpu_slug(name), "model": f"{a.model_dir} "
        f"(load_format={a.load_format})", "model_short": Path(a.model_dir).name,
        "mem_fraction_static": a.mem_fraction_static, "max_total_tokens": a.max_total_tokens,
        "weights_bytes": semipd["weights_bytes"], "kv_pool_tokens": semipd["kv_pool_tokens"],
        "kv_pool_tokens_sglang": stock["kv_pool_tokens"],
        "gpu_mem_semipd_bytes": semipd["gpu_mem_bytes"],
        "gpu_mem_sglang_bytes": stock["gpu_mem_bytes"],
        "weight_copies": semipd["weight_copies"],
        "idle_gpu_mem_bytes": [idle, idle_after],
        "command": shlex.join(["python", "-m", "benchmark.unified_storage", *sys.argv[1:]]),
        "sglang_command": stock_cmd, "semipd": semipd, "sglang": stock,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(a.out) if a.out else RESULTS_DIR / f"unified_storage_{gpu_slug(name)}.json"
    write_result(out, record)
    plot(record, out.with_suffix(".png"))
    gib = 2**30
    print_table([("weights (GiB)", record["weights_bytes"] / gib),
                 ("weight copies (from allocations)", record["weight_copies"]),
                 ("KV pool tokens semi-PD / stock",
                  f"{record['kv_pool_tokens']} / {record['kv_pool_tokens_sglang']}"),
                 ("GPU memory semi-PD (GiB)", record["gpu_mem_semipd_bytes"] / gib),
                 ("GPU memory stock SGLang (GiB)", record["gpu_mem_sglang_bytes"] / gib),
                 ("semi-PD minus stock (GiB)",
                  (record["gpu_mem_semipd_bytes"] - record["gpu_mem_sglang_bytes"]) / gib)],
                f"unified storage, {name}")


if __name__ == "__main__":
    main()
