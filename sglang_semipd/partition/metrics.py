"""Prometheus metrics of the SM partition, exported by the semi-PD scheduler process when the
server runs with ``--enable-metrics``.

SGLang serves ``/metrics`` from prometheus_client's multiprocess registry
(``PROMETHEUS_MULTIPROC_DIR``, set by SGLang's launcher before any process starts), so metrics
created here, in a child process of the launcher, appear there next to SGLang's own:

* ``sglang_semipd:prefill_sms`` / ``decode_sms`` / ``prefill_sm_share`` -- the split in force
  (on the burst split of ``--burst-unconfined`` the prefill worker runs on all SMs: prefill_sms
  is the GPU's SM count, the share 1.0, and ``prefill_unconfined`` 1);
* ``sglang_semipd:resizes_total`` and ``resize_latency_seconds`` (command -> worker switch);
* ``sglang_semipd:iteration_seconds{role=...}`` -- per-phase forward-pass times;
* ``sglang_semipd:slo_attainment`` -- fraction of the requests finished in the last controller
  window that met both the TTFT and the TPOT target.
"""

from __future__ import annotations

from typing import Any, Mapping

from sglang_semipd.partition.splits import SMSplit

_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_ITERATION_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
                      2.0)


class PartitionMetrics:
    """See the module docstring; ``labels`` are constant labels (e.g. the model name)."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.labels = dict(labels)
        names = list(self.labels)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"sglang_semipd:{name}", doc, labelnames=names,
                         multiprocess_mode="mostrecent").labels(**self.labels)

        self.prefill_sms = gauge("prefill_sms", "SMs of the prefill worker's current split.")
        self.decode_sms = gauge("decode_sms", "SMs of the decode worker's current split.")
        self.prefill_share = gauge("prefill_sm_share", "Prefill fraction of the SMs now.")
        self.prefill_unconfined = gauge("prefill_unconfined", "1 while the prefill worker "
                                        "runs on all SMs (--burst-unconfined), else 0.")
        self.attainment = gauge("slo_attainment", "Fraction of the requests finished in the "
                                "last controller window meeting both SLOs.")
        self.resizes = Counter("sglang_semipd:resizes", "Completed SM resizes (both workers "
                               "switched).", labelnames=names).labels(**self.labels)
        self.resize_latency = Histogram(
            "sglang_semipd:resize_latency_seconds", "Resize command to a worker's switch at "
            "its next iteration boundary.", labelnames=names,
            buckets=_LATENCY_BUCKETS).labels(**self.labels)
        self._iteration = Histogram(
            "sglang_semipd:iteration_seconds", "Forward-pass time per worker iteration.",
            labelnames=[*names, "role"], buckets=_ITERATION_BUCKETS)

    def set_split(self, split: SMSplit) -> None:
        self.prefill_sms.set(split.total_sms if split.unconfined else split.prefill_sms)
        self.decode_sms.set(split.decode_sms)
        self.prefill_share.set(split.prefill_fraction)
        self.prefill_unconfined.set(1 if split.unconfined else 0)

    def observe_iteration(self, role: str, seconds: float) -> None:
        self._iteration.labels(**self.labels, role=role).observe(seconds)
