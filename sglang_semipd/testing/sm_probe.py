"""GPU probes of the SM partition (tests/gpu/test_sm_partition_gpu.py, benchmark/sm_partition.py).

They drive the streams the workers use (:func:`sglang_semipd.partition.streams.
build_split_streams`) with a compute-bound bf16 GEMM, whose rate is proportional to the SMs it
may use:

* :func:`gemm_tflops` -- eager, or a CUDA graph captured on one stream and replayed on another;
* :func:`graph_confinement` -- in one process: the full-GPU rate, eager on a green stream, a
  graph captured on that green stream, and a graph captured on an ordinary stream, both
  replayed on the green stream (ARCHITECTURE.md section 3: the last escapes the partition);
* :func:`concurrent_rates` -- two processes (the two worker roles) hammering their streams at
  the same time under the caller's MPS daemon, started together through a barrier.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any, Optional

GEMM_N = 8192


def _operands(n: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    return a, b


def gemm_tflops(stream: Any, capture_on: Optional[Any] = None, iters: int = 30,
                n: int = GEMM_N, per_graph: int = 5) -> float:
    """TFLOP/s of back-to-back ``n x n`` bf16 GEMMs launched on ``stream``; with
    ``capture_on`` they run as a CUDA graph captured on that stream (``per_graph`` GEMMs per
    graph) and replayed on ``stream``."""
    import torch

    a, b = _operands(n)
    out = torch.empty_like(a)
    graph = None
    if capture_on is not None:
        capture_on.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture_on):
            for _ in range(2):
                torch.matmul(a, b, out=out)
        capture_on.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_on):
            for _ in range(per_graph):
                torch.matmul(a, b, out=out)
    launches = max(1, iters // per_graph) if graph is not None else iters
    gemms = launches * per_graph if graph is not None else iters
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on this stream
            graph.replay() if graph is not None else torch.matmul(a, b, out=out)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(launches):
            graph.replay() if graph is not None else torch.matmul(a, b, out=out)
        end.record(stream)
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return 2.0 * n ** 3 * gemms / seconds / 1e12


def graph_confinement(device_index: int = 0, share: float = 0.25) -> dict[str, Any]:
    """Rates on the prefill side of the split nearest ``share`` (see module docstring)."""
    import torch

    from sglang_semipd.partition.streams import build_split_streams, total_sms

    torch.cuda.set_device(device_index)
    streams = build_split_streams("prefill", "green", [share], device_index)
    green, sms = streams.streams[0], streams.sm_counts[0]
    plain = torch.cuda.Stream()
    total = total_sms(device_index)
    full = gemm_tflops(plain)
    eager = gemm_tflops(green)
    captured_green = gemm_tflops(green, capture_on=green)
    captured_plain = gemm_tflops(green, capture_on=plain)
    bound = full * sms / total
    return {
        "sms": sms, "total_sms": total, "full_tflops": full, "green_eager_tflops": eager,
        "graph_captured_on_split_tflops": captured_green,
        "graph_captured_elsewhere_tflops": captured_plain,
        "proportional_bound_tflops": bound,
        # confined: the split-captured graph runs no faster than eager work on the split and
        # clearly below the full-GPU rate
        "confined": bool(captured_green <= 1.15 * eager and captured_green < 0.8 * full),
        "escapes_when_captured_elsewhere": bool(captured_plain > 1.3 * captured_green),
    }


def _hammer(role: str, share: float, seconds: float, barrier: Any, conn: Any) -> None:
    try:
        import torch

        from sglang_semipd.partition.streams import build_split_streams

        torch.cuda.set_device(0)
        streams = build_split_streams(role, "green", [share], 0)
        stream = streams.streams[0]
        a, b = _operands(GEMM_N)
        out = torch.empty_like(a)
        with torch.cuda.stream(stream):
            torch.matmul(a, b, out=out)
        stream.synchronize()
        barrier.wait(120)
        n, t0 = 0, time.monotonic()
        with torch.cuda.stream(stream):
            while time.monotonic() - t0 < seconds:
                for _ in range(5):
                    torch.matmul(a, b, out=out)
                n += 5
                stream.synchronize()
        elapsed = time.monotonic() - t0
        conn.send({"role": role, "sms": streams.sm_counts[0],
                   "tflops": 2.0 * GEMM_N ** 3 * n / elapsed / 1e12})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send({"role": role, "error": repr(exc)})


def concurrent_rates(roles: tuple[str, str], share: float = 0.5, seconds: float = 3.0
                     ) -> list[dict[str, Any]]:
    """Two processes, one per entry of ``roles``, each on its side of the split nearest
    ``share``, running GEMMs for ``seconds`` at the same time (the caller provides MPS
    through the environment)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(roles))
    pipes, procs = [], []
    for role in roles:
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_hammer, args=(role, share, seconds, barrier, writer))
        proc.start()
        pipes.append(reader)
        procs.append(proc)
    try:
        out = []
        for reader in pipes:
            if not reader.poll(300):
                raise TimeoutError("a GEMM process did not report")
            out.append(reader.recv())
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    errors = [r["error"] for r in out if "error" in r]
    if errors:
        raise RuntimeError(f"GEMM process failed: {errors}")
    return out
