"""Latency metrics, SLO attainment and goodput from per-request benchmark results.

Definitions (all times in seconds):

* TPOT of a request = (e2e - ttft) / (output_len - 1) for output_len > 1, else 0.
* A request meets an SLO (ttft_s, tpot_s) iff it succeeded, ttft <= ttft_s and TPOT <= tpot_s.
  With ``itl_p99=True`` (the "tpot50" style SLO) the per-request P99 of its ITLs replaces TPOT.
* Goodput = the highest swept request rate whose attainment is >= 0.9. With
  ``interpolate=True`` it is the rate where the piecewise-linear attainment(rate) curve first
  crosses 0.9 after the last rate that still meets it (linear between adjacent swept rates).
  ``None`` when no swept rate meets the threshold.
* Goodput up to saturation = goodput over the swept rates no higher than the system's
  saturation rate, the request throughput of its run at ``inf`` (counted from the first token).
  A rate above it cannot be sustained: its run only shows how long the system hides the growing
  backlog within the run's few seconds of arrivals. Under the paper's tight SLO a
  prefill-first scheduler hides it well, since decode may slow to a TPOT of 150 ms (stock
  SGLang met it at 48 req/s on ShareGPT, 1.8x its max throughput of 26.5 req/s, in 8 s runs).
  ``None`` without an ``inf`` run.
* Percentiles use numpy's default linear interpolation (``np.percentile``).
* Request throughput = completed requests / the run's duration (bench_serving's). Request
  throughput from the first token = completed / (duration - the smallest TTFT): at ``inf``,
  where every request is sent at once, the span from the first token to the last completion.
  At ``inf`` the first tokens of all requests came at one moment, after a wait that varied
  from 1.2 to 12.4 s between runs of one model (DeepSeek-V2-Lite shape, stock SGLang,
  2026-12-07): the server logs show no request reaching SGLang's scheduler before it, and
  in one such run the HTTP process had tokenized them 10 s before, so the wait is upstream of
  serving. The second figure leaves it out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

ATTAINMENT_TARGET = 0.9


@dataclass(frozen=True)
class SLO:
    """Latency targets: TTFT and TPOT (or per-request P99 ITL when ``itl_p99``), seconds."""

    ttft_s: float
    tpot_s: float
    itl_p99: bool = False

    def scaled(self, s: float) -> "SLO":
        """Both targets multiplied by ``s``."""
        return SLO(self.ttft_s * s, self.tpot_s * s, self.itl_p99)

    def to_json(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "itl_p99": self.itl_p99}


# The paper's SLO sets; "tpot50" = loose TTFT with a per-request P99 ITL of 50 ms.
PAPER_SLOS: dict[str, dict[str, SLO]] = {
    "sharegpt": {"tight": SLO(0.3, 0.15), "loose": SLO(0.4, 0.2), "tpot50": SLO(0.4, 0.05, True)},
    "longbench": {"tight": SLO(2.25, 0.13), "loose": SLO(3.0, 0.18), "tpot50": SLO(3.0, 0.05, True)},
}
SLO_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


@dataclass
class RequestResult:
    """One request's outcome as measured by the client."""

    success: bool
    ttft: float
    e2e: float
    input_len: int
    output_len: int
    itls: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        """(e2e - ttft) / (output_len - 1); 0 for single-token outputs."""
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.output_len > 1 else 0.0

    @property
    def itl_p99(self) -> float:
        """P99 of this request's inter-token latencies (0 without any)."""
        return float(np.percentile(self.itls, 99)) if self.itls else 0.0


def meets(r: RequestResult, slo: SLO) -> bool:
    """Whether request ``r`` satisfies ``slo``."""
    if not r.success or r.ttft > slo.ttft_s:
        return False
    return (r.itl_p99 if slo.itl_p99 else r.tpot) <= slo.tpot_s


def attainment(results: Sequence[RequestResult], slo: SLO) -> float:
    """Fraction of all requests (failures count as misses) that meet ``slo``; 0 if empty."""
    return sum(meets(r, slo) for r in results) / len(results) if results else 0.0


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def latency_summary(results: Sequence[RequestResult], duration_s: float | None = None
                    ) -> dict[str, Any]:
    """TTFT/TPOT/ITL/E2E mean/P50/P90/P99/max over successful requests, plus throughput.

    TPOT statistics use requests with output_len > 1; ITL pools all inter-token gaps.
    Throughputs need ``duration_s`` (else ``None``).
    """
    ok = [r for r in results if r.success]
    out: dict[str, Any] = {
        "requests": len(results), "completed": len(ok),
        "ttft": _stats([r.ttft for r in ok]),
        "tpot": _stats([r.tpot for r in ok if r.output_len > 1]),
        "itl": _stats([x for r in ok for x in r.itls]),
        "e2e": _stats([r.e2e for r in ok]),
    }
    out["request_throughput"] = out["output_throughput_tok_s"] = None
    out["input_throughput_tok_s"] = out["request_throughput_from_first_token"] = None
    if duration_s and duration_s > 0:
        out["request_throughput"] = len(ok) / duration_s
        out["output_throughput_tok_s"] = sum(r.output_len for r in ok) / duration_s
        out["input_throughput_tok_s"] = sum(r.input_len for r in ok) / duration_s
        first = min((r.ttft for r in ok), default=None)
        if first is not None and duration_s > first:
            out["request_throughput_from_first_token"] = len(ok) / (duration_s - first)
    return out


def goodput(points: Mapping[float, float] | Iterable[tuple[float, float]],
            target: float = ATTAINMENT_TARGET, interpolate: bool = False) -> float | None:
    """Goodput from (rate, attainment) points; see the module docstring for the definition."""
    pts = sorted(dict(points).items() if isinstance(points, Mapping) else points)
    good = [i for i, (_, a) in enumerate(pts) if a >= target]
    if not good:
        return None
    i = good[-1]
    rate, att = pts[i]
    if not interpolate or i + 1 >= len(pts):
        return float(rate)
    r2, a2 = pts[i + 1]
    if att == a2:
        return float(rate)
    return float(rate + (r2 - rate) * (att - target) / (att - a2))


def saturation_rate(curve: Iterable[Mapping[str, Any]]) -> float | None:
    """The request throughput of the rate-``inf`` run among ``curve``'s rows (``rate``,
    ``request_throughput[_from_first_token]``), counted from the first token where known;
    None without such a run."""
    for row in curve:
        if row["rate"] in (float("inf"), "inf"):
            first = row.get("request_throughput_from_first_token")
            return first if first is not None else row.get("request_throughput")
    return None


def goodput_up_to(points: Mapping[float, float], saturation: float | None,
                  target: float = ATTAINMENT_TARGET, interpolate: bool = False) -> float | None:
    """Goodput over the finite rates of ``points`` (rate -> attainment) no higher than
    ``saturation`` (module docstring); None where ``saturation`` is None."""
    if saturation is None:
        return None
    return goodput({r: a for r, a in points.items() if r <= saturation}, target, interpolate)


def slo_scale_sweep(runs: Mapping[float, Sequence[RequestResult]], slo: SLO,
                    scales: Sequence[float] = SLO_SCALES, interpolate: bool = False
                    ) -> dict[float, float | None]:
    """Goodput at each SLO scale ``s`` (both targets times ``s``) over per-rate runs."""
    return {s: goodput({rate: attainment(res, slo.scaled(s)) for rate, res in runs.items()},
                       interpolate=interpolate) for s in scales}


def max_throughput(run_summaries: Iterable[Mapping[str, Any]]) -> float | None:
    """The largest ``request_throughput`` among run summaries (None if none is known)."""
    vals = [s.get("request_throughput") for s in run_summaries]
    vals = [float(v) for v in vals if v is not None]
    return max(vals) if vals else None


def results_from_details(record: Mapping[str, Any], input_lens: Sequence[int] | None = None
                         ) -> list[RequestResult]:
    """Per-request results from one bench_serving ``--output-details`` record.

    Uses ``input_lens``, ``output_lens``, ``ttfts``, ``itls`` and ``errors`` (a request
    succeeded iff its error is empty and its TTFT is positive). bench_serving reports output
    length 0 for failures. e2e = ttft + sum(itls) (bench_serving's latency is the time of the
    last chunk, i.e. exactly that sum); TTFT/ITLs are seconds. ``input_lens`` overrides the
    record's: with ``--dataset-name openai`` and transformers 5.x, bench_serving's prompt_len is
    ``len(apply_chat_template(..., tokenize=True))`` = len(BatchEncoding) = 2 for every request,
    so pass the workload's own prompt lengths there.
    """
    n = len(record["ttfts"])
    lens = list(input_lens) if input_lens is not None else record["input_lens"]
    errors = record.get("errors") or [""] * n
    itls = record.get("itls") or [[] for _ in range(n)]
    out = []
    for i in range(n):
        ttft = float(record["ttfts"][i] or 0.0)
        gaps = [float(x) for x in (itls[i] or [])]
        ok = not errors[i] and ttft > 0
        out.append(RequestResult(ok, ttft, ttft + sum(gaps), int(lens[i]),
                                 int(record["output_lens"][i]), gaps))
    return out


def read_details_jsonl(path: Path) -> list[tuple[dict[str, Any], list[RequestResult]]]:
    """Every line of a bench_serving output file as (summary without details, results)."""
    detail_keys = {"input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors",
                   "cached_tokens", "cached_tokens_details", "server_info"}
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "ttfts" not in rec:
            logger.warning("%s: a line without --output-details fields was skipped", path)
            continue
        rows.append(({k: v for k, v in rec.items() if k not in detail_keys}, results_from_details(rec)))
    return rows
