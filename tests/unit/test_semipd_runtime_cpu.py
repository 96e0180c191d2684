"""CPU checks of the semi-PD runtime's plumbing: message routing, per-worker PortArgs, the
hand-off record, logprob export and the private MPS daemon's error paths."""

from __future__ import annotations

import os

import msgspec
import numpy as np
import pytest

from sglang_semipd import protocol as P


def test_generation_and_aborts_reach_both_workers_control_only_prefill():
    from sglang.srt.managers import io_struct

    from sglang_semipd.scheduler import TO_BOTH, also_to_decode

    for name in TO_BOTH:
        assert hasattr(io_struct, name), f"{name} is not an SGLang 0.5.17 message"
    abort = io_struct.AbortReq(rid="x")
    assert also_to_decode(abort) is True
    for obj in (io_struct.FlushCacheReqInput(), io_struct.GetInternalStateReq()):
        assert also_to_decode(obj) is False  # exactly one reply: prefill answers


def test_worker_port_args_differ_only_in_private_endpoints():
    from types import SimpleNamespace

    from sglang_semipd.scheduler import WorkerEndpoints, worker_port_args

    pa = SimpleNamespace(scheduler_input_ipc_name="ipc://tok", rpc_ipc_name="ipc://rpc",
                         detokenizer_ipc_name="ipc://detok", tokenizer_ipc_name="ipc://tm",
                         nccl_port=1, instance_id="i")
    ep = WorkerEndpoints("prefill", "ipc://p-in", "ipc://p-rpc", "ipc://p-out", "ipc://p-h",
                         "ipc://p-ctl", 7)
    out = worker_port_args(pa, ep)
    assert (out.scheduler_input_ipc_name, out.rpc_ipc_name, out.detokenizer_ipc_name,
            out.nccl_port) == ("ipc://p-in", "ipc://p-rpc", "ipc://p-out", 7)
    assert (out.tokenizer_ipc_name, out.instance_id) == ("ipc://tm", "i")
    assert pa.scheduler_input_ipc_name == "ipc://tok"  # the server's own stay untouched


def test_handoff_round_trip_and_refusals():
    h = P.HandOff(rid="r1", req_pool_idx=3, kv_len=40, first_token=17, cache_protected_len=40,
                  last_node=9, last_node_prefix_len=40, send_token_offset=1,
                  logprob={"output_token_logprobs_val": [-0.25]})
    frames = P.encode_handoff(h)
    assert frames[0] == P.HANDOFF_TAG
    assert P.decode_handoff(frames) == h
    with pytest.raises(P.ProtocolError):
        P.decode_handoff([b"other", frames[1]])
    with pytest.raises(P.ProtocolError):
        P.decode_handoff([P.HANDOFF_TAG, b"\xc1garbage"])
    old = msgspec.msgpack.encode(msgspec.structs.replace(h, v=P.PROTOCOL_VERSION + 1))
    with pytest.raises(P.ProtocolError) as info:
        P.decode_handoff([P.HANDOFF_TAG, old])
    assert info.value.code == P.ErrorCode.VERSION


def test_logprobs_are_exported_as_plain_lists():
    import torch
    from sglang.srt.managers.schedule_batch import ReqLogprob

    from sglang_semipd.workers import export_logprobs

    lp = ReqLogprob(top_logprobs_num=2, token_ids_logprob=None,
                    input_token_logprobs_val=[None, -1.5], input_token_logprobs_idx=[5, 6],
                    output_token_logprobs_val=[-0.5], output_token_logprobs_idx=[7],
                    output_top_logprobs_val=[np.array([-0.5, -2.0])],
                    output_token_ids_logprobs_val=[torch.tensor([-3.0])])

    class R:
        logprob = lp

    out = export_logprobs(R())
    assert out["input_token_logprobs_val"] == [None, -1.5]
    assert out["output_top_logprobs_val"] == [[-0.5, -2.0]]
    assert out["output_token_ids_logprobs_val"] == [[-3.0]]
    assert "input_top_logprobs_val" not in out  # unset fields are not sent
    msgspec.msgpack.encode(P.HandOff(rid="x", logprob=out))  # travels as-is


def test_private_mps_errors_are_clear(tmp_path, monkeypatch):
    from sglang_semipd.mps import MPSError, PrivateMPS

    monkeypatch.setenv("PATH", "/nonexistent")
    failed = PrivateMPS()
    with pytest.raises(MPSError, match="not found on PATH"):
        failed.start()
    assert not os.path.exists(failed.pipe_dir)  # its private directory is gone too
    with pytest.raises(MPSError, match="no MPS control pipe"):
        PrivateMPS(pipe_dir=str(tmp_path)).start()
    (tmp_path / "control").touch()
    adopted = PrivateMPS(pipe_dir=str(tmp_path)).start()
    assert adopted.child_env() == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    adopted.stop()  # never quits a daemon it did not start
    assert os.path.exists(tmp_path / "control")


def _fake_control(tmp_path):
    """Stands in for nvidia-cuda-mps-control (absent on CPU): records what it is told."""
    marker = tmp_path / "told.txt"
    script = tmp_path / "control-bin"
    script.write_text(f"#!/bin/sh\ncat >> {marker}\necho \"$CUDA_MPS_PIPE_DIRECTORY\" >> {marker}\n")
    script.chmod(0o755)
    return str(script), marker


def test_reaper_quits_the_daemon_when_the_server_dies_without_cleanup(tmp_path):
    import subprocess
    import sys

    binary, marker = _fake_control(tmp_path)
    root = tmp_path / "mps-root"
    (root / "pipe").mkdir(parents=True)
    server = subprocess.Popen(["sleep", "1"])
    reaper = subprocess.run([sys.executable, "-m", "sglang_semipd.mps", "--reap",
                             str(server.pid), str(root), "--binary", binary, "--foreground"],
                            timeout=30)
    server.wait()
    assert reaper.returncode == 0
    assert marker.read_text().splitlines() == ["quit", str(root / "pipe")]
    assert not root.exists()


def test_reaper_leaves_quietly_after_a_normal_stop(tmp_path):
    from sglang_semipd.mps import reap

    binary, marker = _fake_control(tmp_path)
    root = tmp_path / "mps-root"
    root.mkdir()
    import threading

    threading.Timer(0.3, lambda: root.rmdir()).start()  # what PrivateMPS.stop() does
    assert reap(os.getpid(), str(root), binary, poll_s=0.05) is False
    assert not marker.exists()


def test_role_server_args_graphs_decode_worker_decode_only(tmp_path):
    import copy

    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase
    from sglang.srt.model_executor.model_runner_components.cuda_graph_setup import (
        check_cuda_graph_backend)
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    from sglang_semipd.testing.model_maker import make_model
    from sglang_semipd.workers import role_server_args

    model = make_model(tmp_path / "tiny", "tiny", "bfloat16", seed=0)
    sa = ServerArgs(model_path=str(model), device="cpu", attention_backend="triton",
                    sampling_backend="pytorch", grammar_backend="none")
    assert sa.cuda_graph_config.decode.backend != Backend.DISABLED
    seen = {}
    for role in ("prefill", "decode"):
        w = role_server_args(role, copy.deepcopy(sa))
        publish(w, role="scheduler")  # what the worker process does before building SGLang
        seen[role] = (check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED),
                      check_cuda_graph_backend(Phase.PREFILL, Backend.DISABLED))
        assert w.radix_cache_backend == "semipd" and w.disable_overlap_schedule
    # (decode graphs disabled?, prefill graphs disabled?)
    assert seen == {"prefill": (True, True), "decode": (False, True)}
    assert sa.cuda_graph_config.decode.backend != Backend.DISABLED  # the user's untouched
    assert sa.radix_cache_backend != "semipd"


def test_role_server_args_prefill_graphs_only_for_the_prefill_worker_and_only_if_asked(
        tmp_path):
    """``--prefill-graphs``: the prefill worker keeps SGLang's own prefill-graph setting (and
    still captures no decode graphs); the decode worker never captures prefill graphs."""
    import copy

    from sglang.srt.model_executor.cuda_graph_config import Backend
    from sglang.srt.server_args import ServerArgs

    from sglang_semipd.testing.model_maker import make_model
    from sglang_semipd.workers import role_server_args

    model = make_model(tmp_path / "tiny", "tiny", "bfloat16", seed=0)
    sa = ServerArgs(model_path=str(model), device="cpu", attention_backend="triton",
                    sampling_backend="pytorch", grammar_backend="none")
    sglang_prefill = sa.cuda_graph_config.prefill.backend
    assert sglang_prefill != Backend.DISABLED  # SGLang's default for a Llama-type model

    def backends(role: str, graphs: bool) -> tuple:
        w = role_server_args(role, copy.deepcopy(sa), prefill_graphs=graphs)
        return w.cuda_graph_config.prefill.backend, w.cuda_graph_config.decode.backend

    assert backends("prefill", True) == (sglang_prefill, Backend.DISABLED)
    assert backends("prefill", False) == (Backend.DISABLED, Backend.DISABLED)
    assert backends("decode", True)[0] == Backend.DISABLED
    assert backends("decode", True)[1] == sa.cuda_graph_config.decode.backend
    mla_like = copy.deepcopy(sa)  # SGLang's own rules turned them off (as for MLA)
    mla_like.cuda_graph_config.prefill.backend = Backend.DISABLED
    assert role_server_args("prefill", mla_like, prefill_graphs=True) \
        .cuda_graph_config.prefill.backend == Backend.DISABLED


def test_role_server_args_overlap_per_worker_as_asked_and_only_if_sglang_allows(
        tmp_path, caplog):
    import copy

    from sglang.srt.server_args import ServerArgs

    from sglang_semipd.testing.model_maker import make_model
    from sglang_semipd.workers import role_server_args

    model = make_model(tmp_path / "tiny", "tiny", "bfloat16", seed=0)
    sa = ServerArgs(model_path=str(model), device="cpu", attention_backend="triton",
                    sampling_backend="pytorch", grammar_backend="none")
    assert not sa.disable_overlap_schedule  # SGLang's default
    assert role_server_args("prefill", copy.deepcopy(sa), True).disable_overlap_schedule
    assert not role_server_args("decode", copy.deepcopy(sa), True).disable_overlap_schedule
    assert role_server_args("decode", copy.deepcopy(sa)).disable_overlap_schedule
    assert not role_server_args("prefill", copy.deepcopy(sa), False, True).disable_overlap_schedule
    assert role_server_args("decode", copy.deepcopy(sa), False, True).disable_overlap_schedule
    off = copy.deepcopy(sa)  # as SGLang's own checks resolve it for some features
    off.override("a feature without overlap", disable_overlap_schedule=True)
    assert role_server_args("decode", copy.deepcopy(off), True).disable_overlap_schedule
    assert "--decode-overlap" in caplog.text and "runs without it" in caplog.text
    assert role_server_args("prefill", off, False, True).disable_overlap_schedule
    assert "the prefill worker runs without it" in caplog.text


def test_under_overlap_the_prefill_worker_never_merges_its_last_prefill_batch(monkeypatch):
    """SGLang's overlap loop merges the last prefill batch into the running batch before
    that batch's results are handled (its hand-off). The prefill worker empties it first:
    its requests leave for the decode worker. SGLang's own pass is played by a recorder of
    what it would merge; the batches are SGLang's ``ScheduleBatch``."""
    from types import SimpleNamespace

    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_semipd.workers import AdmissionRetry, _SemiPDMixin, make_prefill_scheduler_cls

    merged, calls = [], []
    monkeypatch.setattr(_SemiPDMixin, "get_next_batch_to_run",
                        lambda self, running_batch, last_batch: merged.append(
                            list(last_batch.reqs) if last_batch is not None else None) or "plan")
    worker = object.__new__(make_prefill_scheduler_cls())
    worker.semipd_admission = AdmissionRetry()
    worker.token_to_kv_pool_allocator = SimpleNamespace(
        release_ready=lambda: calls.append("release_ready"))
    worker.req_to_token_pool = SimpleNamespace(flush_rows=lambda: calls.append("flush_rows"))
    reqs = ["r1", "r2"]
    for overlap, mode, expect in ((True, ForwardMode.EXTEND, []),
                                  (False, ForwardMode.EXTEND, reqs),
                                  (True, ForwardMode.DECODE, reqs)):
        worker.enable_overlap = overlap
        last = ScheduleBatch(reqs=list(reqs), forward_mode=mode)
        copy_for_results = last.copy()
        assert worker.get_next_batch_to_run(None, last) == "plan"
        assert merged.pop() == expect, (overlap, mode)
        assert copy_for_results.reqs == reqs  # what its results are handled with
    assert calls == ["release_ready", "flush_rows"] * 2  # overlap: gated frees that are done
    assert worker.get_next_batch_to_run(None, None) == "plan" and merged.pop() is None


def test_prefill_hand_off_of_a_batch_with_a_chunked_request_with_and_without_overlap(
        monkeypatch):
    """A prefill batch whose requests are handed off next to one still being chunked.
    Without overlap the batch is the one SGLang merges next, and only the chunked request
    stays in it. Under overlap the results come with ``ScheduleBatch.copy()``, which has no
    CPU index lists: filtering it crashed the prefill worker on the H100 (session 14), so it
    is left alone there (the last batch itself was emptied before SGLang's merge). SGLang's
    result pass is played by a recorder that gives each non-chunked request its first token;
    requests and batches are SGLang's."""
    from array import array
    from types import SimpleNamespace

    import torch
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sglang_semipd.workers import _SemiPDMixin, make_prefill_scheduler_cls

    def result_pass(self, batch, result):
        for r in batch.reqs:
            if r is not self.chunked_req:
                r.output_ids.append(7)
                if r.rid == "ends":
                    r.finished_reason = FINISH_LENGTH(length=1)

    monkeypatch.setattr(_SemiPDMixin, "process_batch_result", result_pass)
    for overlap in (False, True):
        worker = object.__new__(make_prefill_scheduler_cls())
        worker.enable_overlap, worker.semipd_batch_handoff = overlap, False
        sent, moved = [], []
        worker._send_handoff = sent.append
        worker._transfer = lambda r: moved.append(r.rid)
        reqs = [Req(rid, "", array("q", [1, 2, 3]), SamplingParams(max_new_tokens=8))
                for rid in ("a", "ends", "b", "chunked")]
        for k, r in enumerate(reqs):
            r.req_pool_idx, r.kv_committed_len = k, 3
        worker.chunked_req = reqs[-1]
        n = len(reqs)
        batch = ScheduleBatch(
            reqs=list(reqs), forward_mode=ForwardMode.EXTEND, device="cpu",
            model_config=SimpleNamespace(is_encoder_decoder=False),
            req_pool_indices=torch.arange(n), req_pool_indices_cpu=torch.arange(n),
            seq_lens=torch.full((n,), 3), orig_seq_lens=torch.full((n,), 3),
            sampling_info=SimpleNamespace(filter_batch=lambda keep, keep_device: None))
        worker.process_batch_result(batch.copy() if overlap else batch, None)
        assert moved == ["a", "b"], overlap
        assert [(h.rid, h.finished) for h in sent] == \
            [("ends", True), ("a", False), ("b", False)], overlap
        assert [h.req_pool_idx for h in sent[1:]] == [0, 2]
        assert reqs[0].req_pool_idx is None and reqs[2].req_pool_idx is None
        assert [r.rid for r in batch.reqs] == \
            (["a", "ends", "b", "chunked"] if overlap else ["chunked"])


def test_prefill_abort_echoes_are_passed_on_to_the_decode_worker():
    from sglang.srt.managers.io_struct import AbortReq
    from sglang.srt.managers.scheduler_components.output_sender import SenderWrapper

    from sglang_semipd.workers import tell_decode_about_aborts

    sender = SenderWrapper(None)  # no socket: SGLang's wrapper then sends nothing
    told = []
    tell_decode_about_aborts(sender, told.append)
    sender.send_output(AbortReq(rid="queued-1"))
    sender.send_output(AbortReq(abort_all=True))
    sender.send_output(AbortReq(rid=""))
    assert told == ["queued-1"]
