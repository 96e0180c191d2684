"""Unit tests for the semi-PD latency model (sglang_semipd.slo.model)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_semipd.slo.model import (
    LatencyModel,
    ModelPriors,
    OnlineLinearFit,
    lognormal_cdf,
    quantile,
)


def _ttft_obs(a: float, b: float, shares: list[float], lam: float, l_full: float) -> list:
    """(phi, y) pairs of the TTFT model TTFT = a * l / (x - lam) + b."""
    return [((l_full / (x - lam), 1.0), a * l_full / (x - lam) + b) for x in shares]


def test_fit_recovers_noiseless_ttft_parameters() -> None:
    # Priors deliberately far from the truth: the data must win.
    fit = OnlineLinearFit((1.0, 0.2), decay=1.0)
    for phi, y in _ttft_obs(2.0, 0.05, [0.3, 0.4, 0.5, 0.6, 0.7, 0.8] * 5, 0.2, 0.1):
        fit.add(phi, y)
    res = fit.fit()
    assert res.identified and res.distinct == 6 and res.n == 30
    assert res.a == pytest.approx(2.0, rel=0.03)
    assert res.b == pytest.approx(0.05, abs=0.01)


def test_fit_recovers_noisy_ttft_parameters() -> None:
    rng = random.Random(7)
    fit = OnlineLinearFit((1.0, 0.2), max_obs=200, decay=1.0)
    shares = [rng.choice([0.3, 0.4, 0.5, 0.6, 0.7, 0.8]) for _ in range(200)]
    for phi, y in _ttft_obs(2.0, 0.05, shares, 0.2, 0.1):
        fit.add(phi, y * rng.gauss(1.0, 0.05))
    res = fit.fit()
    assert res.a == pytest.approx(2.0, rel=0.08)
    assert res.b == pytest.approx(0.05, abs=0.02)


def test_fit_recovers_decode_step_with_batch_term() -> None:
    # step = (a + c * batch) / y + b, regressors (1/y, batch/y, 1)
    a, c, b = 0.006, 1.5e-4, 0.008
    rng = random.Random(3)
    fit = OnlineLinearFit((0.01, 1e-4, 0.01), max_obs=300, decay=1.0)
    for _ in range(300):
        y, batch = rng.choice([0.2, 0.4, 0.5, 0.8]), rng.randint(1, 60)
        fit.add((1 / y, batch / y, 1.0), ((a + c * batch) / y + b) * rng.gauss(1.0, 0.02))
    got_a, got_c, got_b = fit.fit().coef
    assert got_a == pytest.approx(a, rel=0.15)
    assert got_c == pytest.approx(c, rel=0.1)
    assert got_b == pytest.approx(b, rel=0.15)


def test_empty_fit_falls_back_to_priors() -> None:
    fit = OnlineLinearFit((2.3, 0.02))
    res = fit.fit()
    assert res.coef == (2.3, 0.02)
    assert res.n == 0 and not res.identified


def test_single_distinct_share_keeps_prior_proportions() -> None:
    """One distinct x cannot identify (a, b): match the data's level, keep the priors' ratio."""
    fit = OnlineLinearFit((2.0, 0.1), decay=1.0)
    u0 = 0.5
    for _ in range(50):
        fit.add((u0, 1.0), 3.0)  # prior predicts 2.0 * 0.5 + 0.1 = 1.1 there
    res = fit.fit()
    assert not res.identified and res.distinct == 1
    assert res.predict((u0, 1.0)) == pytest.approx(3.0, rel=0.02)
    assert res.a / res.b == pytest.approx(2.0 / 0.1, rel=1e-6)


def test_bad_observations_are_ignored_and_coefficients_stay_non_negative() -> None:
    fit = OnlineLinearFit((1.0, 0.1), prior_weight=1e-3)
    fit.add((math.nan, 1.0), 1.0)
    fit.add((0.5, 1.0), math.inf)
    fit.add((-1.0, 1.0), 1.0)
    fit.add((0.5, 1.0), 1.0, weight=0.0)
    fit.add((1.0,), 1.0)  # wrong arity
    assert len(fit) == 0
    # Decreasing data would need a < 0: the fit clamps a to 0 instead.
    for u in (0.2, 0.4, 0.8, 1.6):
        fit.add((u, 1.0), 1.0 - 0.3 * u)
    res = fit.fit()
    assert res.a == 0.0 and res.b > 0.0
    with pytest.raises(ValueError):
        OnlineLinearFit((0.0, 1.0))


def test_window_is_bounded_and_decay_tracks_change() -> None:
    old = [((u, 1.0), 1.0 * u + 0.1) for u in (0.2, 0.4, 0.8, 1.6) * 10]
    new = [((u, 1.0), 3.0 * u + 0.1) for u in (0.2, 0.4, 0.8, 1.6) * 5]
    bounded = OnlineLinearFit((1.0, 0.1), max_obs=20, decay=1.0)
    decaying = OnlineLinearFit((1.0, 0.1), max_obs=1000, decay=0.8)
    for phi, y in old + new:
        bounded.add(phi, y)
        decaying.add(phi, y)
    assert len(bounded) == 20
    assert bounded.fit().a == pytest.approx(3.0, rel=0.02)  # only the new regime is left
    assert decaying.fit().a == pytest.approx(3.0, rel=0.05)  # old regime weighed out


@settings(max_examples=40, deadline=None)
@given(
    a=st.floats(0.1, 5.0),
    b=st.floats(0.001, 0.5),
    us=st.lists(st.floats(0.05, 5.0), min_size=3, max_size=12, unique=True),
)
def test_fit_is_exact_on_noiseless_data_with_weak_prior(a: float, b: float, us: list) -> None:
    if max(us) - min(us) < 0.05:
        return
    fit = OnlineLinearFit((1.0, 0.1), prior_weight=1e-6, decay=1.0)
    for u in us:
        fit.add((u, 1.0), a * u + b)
    res = fit.fit()
    assert res.a == pytest.approx(a, rel=1e-3, abs=1e-3)
    assert res.b == pytest.approx(b, rel=1e-2, abs=1e-3)


def test_lognormal_cdf_and_quantile() -> None:
    assert lognormal_cdf(0.5, 0.5, 0.3) == pytest.approx(0.9)
    assert lognormal_cdf(1.0, 0.5, 0.3) > 0.99
    assert lognormal_cdf(0.1, 0.5, 0.3) < 0.01
    assert lognormal_cdf(1.0, math.inf, 0.3) == 0.0
    assert quantile([], 0.9) != quantile([], 0.9)  # nan
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_latency_model_learns_ttft_and_predicts_overload() -> None:
    m = LatencyModel(ModelPriors(ttft_a=1.0, ttft_b=0.2), decay=1.0)
    m.observe_rate(2.0, smooth=False)
    m.observe_prefill_time(0.1, smooth=False)
    assert m.lam == pytest.approx(0.2)
    for x in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8) * 4:
        m.observe_ttft(x, 2.0 * 0.1 / (x - 0.2) + 0.03)
    fit = m.ttft_fit.fit()
    assert fit.a == pytest.approx(2.0, rel=0.05)
    assert fit.b == pytest.approx(0.03, abs=0.015)
    assert m.predict_ttft_p90(0.4) == pytest.approx(2.0 * 0.1 / 0.2 + 0.03, rel=0.05)
    # At or below the load the queue never drains: infinite P90, zero attainment.
    assert m.predict_ttft_p90(0.2) == math.inf
    assert m.predict(0.2, 1.0, 1.0).p_ttft == 0.0
    # A backlog raises the prediction (drain time) but never lowers it.
    assert m.predict_ttft_p90(0.4, queue_len=20) > m.predict_ttft_p90(0.4)


def test_latency_model_decode_prediction_follows_littles_law() -> None:
    m = LatencyModel(ModelPriors(tpot_a=0.006, tpot_c=1.5e-4, tpot_b=0.008, tpot_tail_ratio=1.0))
    base = m.predict_step_s(0.5)
    assert base == pytest.approx(0.006 / 0.5 + 0.008)
    m.observe_decode_demand(1000.0, smooth=False)  # tokens/s
    loaded = m.predict_step_s(0.5)
    assert loaded == pytest.approx((0.006 / 0.5 + 0.008) / (1 - 1.5e-4 * 1000 / 0.5))
    assert m.predict_step_s(0.3) > loaded  # less share, slower steps
    assert m.predict_step_s(0.15) == math.inf  # c * D / y >= 1: cannot keep up
    preds = [m.predict(x, 0.6, 0.05) for x in (0.2, 0.5, 0.8)]
    assert preds[0].p_tpot > preds[1].p_tpot > preds[2].p_tpot
    assert preds[0].p_ttft <= preds[1].p_ttft <= preds[2].p_ttft


def test_tpot_tail_ratio_calibrates_at_operating_point() -> None:
    m = LatencyModel(ModelPriors(tpot_tail_ratio=1.0), ewma_alpha=1.0)
    step = m.predict_step_s(0.5)
    m.observe_tpot(0.5, [step * 1.3] * 10)
    assert m.predict_tpot_p90(0.5) == pytest.approx(step * 1.3)
