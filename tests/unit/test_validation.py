"""Token ids outside the vocabulary are refused before they reach the GPU: the pure check, and
the worker patch of SGLang's ``validate_input_length`` applied to SGLang's own ``Req``."""

from __future__ import annotations

from array import array

import pytest

from sglang_semipd.validation import out_of_vocab_error


def test_in_range_ids_pass():
    assert out_of_vocab_error([0, 5, 99], 100) is None
    assert out_of_vocab_error(array("q", [99]), 100) is None
    assert out_of_vocab_error([], 100) is None
    assert out_of_vocab_error([10**9], None) is None  # unknown vocabulary: no opinion


@pytest.mark.parametrize("ids,pos,bad", [([1, 100, 2], 1, 100), ([-3, 1], 0, -3),
                                         (array("q", [4, 5, 2**40]), 2, 2**40)])
def test_the_first_bad_id_is_named(ids, pos, bad):
    msg = out_of_vocab_error(ids, 100)
    assert msg == (f"Input token id {bad} at position {pos} is outside the model's "
                   "vocabulary [0, 100).")


def test_worker_patch_makes_sglangs_input_check_refuse_a_bad_id(monkeypatch):
    import sglang.srt.managers.scheduler as sched
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sglang_semipd import patches

    original = sched.validate_input_length
    monkeypatch.setattr(sched, "validate_input_length", original)  # restored afterwards
    patch = next(p for p in patches.WORKER_PATCHES if p.qualname == "validate_input_length")
    patch.apply()
    check = sched.validate_input_length
    assert check is not original

    def req(ids):
        return Req("r", "", ids, SamplingParams(max_new_tokens=4), vocab_size=100)

    assert check(req([1, 2, 3]), 1000, False) is None
    bad = req([1, 250, 3])
    error = check(bad, 1000, False)
    assert error and "250 at position 1" in error
    assert "exceeds" in check(req(list(range(20))), 10, False)  # SGLang's own check first
