"""SLO-aware SM partitioning for semi-PD: latency model, policies and a CPU simulator.

Pure standard-library Python (no torch/numpy), safe to import anywhere.
"""

from __future__ import annotations

from sglang_semipd.slo.model import (
    CandidatePrediction,
    LatencyModel,
    LinearFit,
    ModelPriors,
    OnlineLinearFit,
)
from sglang_semipd.slo.policy import (
    DEFAULT_SHARES,
    PartitionDecision,
    PartitionPolicy,
    SLOPolicy,
    SLOTargets,
    StaticPolicy,
    WindowStats,
)

__all__ = [
    "DEFAULT_SHARES",
    "CandidatePrediction",
    "LatencyModel",
    "LinearFit",
    "ModelPriors",
    "OnlineLinearFit",
    "PartitionDecision",
    "PartitionPolicy",
    "SLOPolicy",
    "SLOTargets",
    "StaticPolicy",
    "WindowStats",
]
