"""Per-split CUDA graphs in the workers (``workers._SemiPDMixin.semipd_capture_split_graphs``
and ``semipd_activate``): a graph keeps the SMs of the stream it was captured on, so each
planned split gets its own graph runner, captured while ``partition.streams.capture_stream``
names that split's stream, and a resize swaps the split's runner in. The decode worker does
this for SGLang's decode graphs, the prefill worker for SGLang's prefill graphs with
``--prefill-graphs``. SGLang's ``ModelRunner`` is played by a recorder of what its
``init_<phase>_cuda_graph`` would capture on (the mixin is under test; capturing itself needs
a GPU: ``tests/gpu``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_semipd.partition.streams import current_capture_stream
from sglang_semipd.workers import _SemiPDMixin


class _RunnerStandIn:
    """A graph runner: which phase, captured on which stream, with which attention backend."""

    def __init__(self, phase: str, stream, backend) -> None:
        self.phase, self.stream, self.backend = phase, stream, backend


class _ModelRunnerStandIn:
    def __init__(self, start_stream) -> None:
        self.attn_backend = "backend-0"
        self.backends_made = 0
        self.decode_cuda_graph_runner = _RunnerStandIn("decode", start_stream, "backend-0")
        self.prefill_cuda_graph_runner = _RunnerStandIn("prefill", start_stream, "backend-0")

    def _get_attention_backend(self):
        self.backends_made += 1
        return f"backend-{self.backends_made}"

    def init_decode_cuda_graph(self) -> None:
        self.decode_cuda_graph_runner = _RunnerStandIn(
            "decode", current_capture_stream(), self.attn_backend)

    def init_prefill_cuda_graph(self) -> None:
        self.prefill_cuda_graph_runner = _RunnerStandIn(
            "prefill", current_capture_stream(), self.attn_backend)


class Worker(_SemiPDMixin):
    semipd_role = "prefill"

    def __init__(self, mode: str = "green", n: int = 4, start: int = 2,
                 role: str = "prefill") -> None:
        self.semipd_role = role
        self.streams = [f"stream-{i}" for i in range(n)]
        self.semipd_streams = SimpleNamespace(mode=mode, streams=self.streams)
        self.tp_worker = SimpleNamespace(model_runner=_ModelRunnerStandIn(self.streams[start]))


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_each_split_gets_graphs_captured_on_its_own_stream(phase):
    w = Worker(role=phase)
    mr = w.tp_worker.model_runner
    first = getattr(mr, f"{phase}_cuda_graph_runner")
    w.semipd_capture_split_graphs(2)
    runners = w.semipd_graph_runners
    assert sorted(runners) == [0, 1, 2, 3] and runners[2] is first
    assert all(r.stream == f"stream-{i}" and r.phase == phase for i, r in runners.items())
    # the start split's runner and the model runner's own backend are back in place
    assert getattr(mr, f"{phase}_cuda_graph_runner") is first
    assert mr.attn_backend == "backend-0"
    assert current_capture_stream() is None
    if phase == "decode":  # a decode runner keeps the backend whose buffers it captured
        assert mr.backends_made == 3
        assert len({r.backend for r in runners.values()}) == 4
    else:  # SGLang's prefill runner reads the model runner's backend at every replay
        assert mr.backends_made == 0
        assert {r.backend for r in runners.values()} == {"backend-0"}
    other = "prefill" if phase == "decode" else "decode"
    untouched = getattr(mr, f"{other}_cuda_graph_runner")
    w.semipd_activate(0)
    assert getattr(mr, f"{phase}_cuda_graph_runner") is runners[0]
    assert getattr(mr, f"{other}_cuda_graph_runner") is untouched
    w.semipd_activate(3)
    assert getattr(mr, f"{phase}_cuda_graph_runner").stream == "stream-3"


def test_no_graphs_to_multiply_outside_green_or_without_a_graph_runner():
    from sglang.srt.model_executor.runner.eager_runner import EagerRunner

    for mode in ("mps", "none"):
        w = Worker(mode=mode, role="decode")
        w.semipd_capture_split_graphs(2)
        assert list(w.semipd_graph_runners) == [2]
    w = Worker()
    w.tp_worker.model_runner.prefill_cuda_graph_runner = None  # SGLang turned them off
    w.semipd_capture_split_graphs(2)
    assert w.semipd_graph_runners == {2: None}
    w.semipd_activate(1)  # nothing to swap in: the model runner keeps what it has
    assert w.tp_worker.model_runner.prefill_cuda_graph_runner is None
    w = Worker()
    eager = EagerRunner.__new__(EagerRunner)  # SGLang's stand-in when graphs are off
    w.tp_worker.model_runner.prefill_cuda_graph_runner = eager
    w.semipd_capture_split_graphs(2)
    assert w.semipd_graph_runners == {2: eager}


def test_a_worker_without_split_graphs_activates_splits_without_touching_runners():
    w = Worker()
    mr = w.tp_worker.model_runner
    before = (mr.decode_cuda_graph_runner, mr.prefill_cuda_graph_runner)
    w.semipd_activate(1)
    assert (mr.decode_cuda_graph_runner, mr.prefill_cuda_graph_runner) == before
