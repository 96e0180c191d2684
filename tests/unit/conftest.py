"""Fixtures of the CPU tests: ``wired``, the semi-PD scheduler's routing loop over real
ZeroMQ sockets, its worker processes played by sockets of the test (parametrize it
indirectly with an ``--sm-partition`` mode; default ``green``); ``bench_out`` and
``bench_record`` for the benchmark report tests (bench_serving output as it is written)."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from sglang_semipd.config import SemiPDConfig
from sglang_semipd.partition.resize import ResizeTracker
from sglang_semipd.partition.splits import plan_splits
from sglang_semipd.scheduler import Coordinator
from sglang_semipd.trace import TRACE_ENV


@pytest.fixture(params=["green"])
def wired(tmp_path, monkeypatch, request):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace.jsonl"))
    ctx = zmq.Context.instance()
    port_args = SimpleNamespace(scheduler_input_ipc_name=f"ipc://{tmp_path}/sched-in",
                                detokenizer_ipc_name=f"ipc://{tmp_path}/detok",
                                tokenizer_ipc_name=f"ipc://{tmp_path}/tok", rpc_ipc_name="",
                                nccl_port=0)
    tokenizer = ctx.socket(zmq.PUSH)  # SGLang's TokenizerManager binds PUSH here
    tokenizer.bind(port_args.scheduler_input_ipc_name)
    detok = ctx.socket(zmq.PULL)  # the DetokenizerManager binds PULL
    detok.bind(port_args.detokenizer_ipc_name)
    coord = Coordinator(SimpleNamespace(), port_args, gpu_id=0, tp_rank=0,
                        semipd=SemiPDConfig(sm_partition=request.param))
    coord.splits = list(plan_splits([0.25, 0.5, 0.75], total_sms=132))  # 40, 72, 104
    coord.resizes = ResizeTracker(1)
    coord._bind_sockets()
    worker_in, worker_out, worker_ctl = {}, {}, {}
    for role, ep in coord.endpoints.items():
        worker_in[role] = ctx.socket(zmq.PULL)
        worker_in[role].connect(ep.scheduler_input)
        worker_out[role] = ctx.socket(zmq.PUSH)
        worker_out[role].connect(ep.output)
        worker_ctl[role] = ctx.socket(zmq.PULL)
        worker_ctl[role].connect(ep.control)
    decode_handoffs = ctx.socket(zmq.PULL)
    decode_handoffs.connect(coord.endpoints["decode"].handoff)
    thread = threading.Thread(target=coord.serve, daemon=True)
    thread.start()
    time.sleep(0.2)
    yield SimpleNamespace(coord=coord, tokenizer=tokenizer, detok=detok, worker_in=worker_in,
                          worker_out=worker_out, worker_ctl=worker_ctl,
                          decode_handoffs=decode_handoffs, trace=tmp_path / "trace.jsonl",
                          thread=thread)
    coord._stop = True
    thread.join(5)
    coord.stop()  # no children here: only removes its run directory
    for s in [tokenizer, detok, decode_handoffs, *worker_in.values(), *worker_out.values(),
              *worker_ctl.values()]:
        s.close(0)


def _bench_record(n: int, ttft: float, gap: float, out_len: int = 5) -> dict:
    """A bench_serving ``--output-details`` record (the fields the report reads): ``n``
    requests, each with this TTFT and ``out_len - 1`` ITLs of ``gap`` seconds."""
    return {"duration": n * 0.1, "completed": n, "ttfts": [ttft] * n,
            "itls": [[gap] * (out_len - 1)] * n, "output_lens": [out_len] * n,
            "input_lens": [2] * n, "errors": [""] * n}


@pytest.fixture
def bench_out(tmp_path):
    """Workloads made by ``benchmark.compare.prepare`` (12 requests each) and an output
    directory with a ``meta.json``; ``write(run, rate, ttft, gap, wname="sharegpt")`` leaves
    a run file there as ``benchmark.compare run`` would."""
    from benchmark import compare

    index = compare.prepare(tmp_path / "wl", num=12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text('{"gpu": "H100", "model": "llama8b"}')

    def write(run: str, rate: float, ttft: float, gap: float, wname: str = "sharegpt") -> None:
        compare.run_file(out, run, wname, rate).write_text(
            json.dumps(_bench_record(12, ttft, gap)) + "\n")
    return SimpleNamespace(index=index, out=out, write=write)


@pytest.fixture
def bench_record():
    """``bench_record(n, ttft, gap, out_len=5)``: a bench_serving ``--output-details`` record
    (see ``_bench_record``)."""
    return _bench_record
