"""The partition's Prometheus metrics through prometheus_client's multiprocess registry, the way
SGLang's ``/metrics`` reads them (``PROMETHEUS_MULTIPROC_DIR``), in a fresh interpreter: one
process writes them (as the semi-PD scheduler process does), another collects them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

WRITE = """
import sys
from sglang_semipd.partition.metrics import PartitionMetrics
from sglang_semipd.partition.splits import SMSplit
m = PartitionMetrics({"model_name": "tiny"})
m.set_split(SMSplit(40, 92, 0.3))
if sys.argv[1:] == ["burst"]:
    m.set_split(SMSplit(104, 28, 0.79, unconfined=True))
m.resizes.inc()
m.resize_latency.observe(0.0008)
m.observe_iteration("decode", 0.012)
m.observe_iteration("prefill", 0.3)
m.attainment.set(0.93)
"""

COLLECT = """
import json
from prometheus_client import CollectorRegistry, multiprocess
reg = CollectorRegistry()
multiprocess.MultiProcessCollector(reg)
out = {}
for metric in reg.collect():
    for s in metric.samples:
        if s.name.startswith("sglang_semipd:"):
            out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
print(json.dumps(out))
"""


def test_metrics_reach_the_multiprocess_registry(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", WRITE], env=env, check=True, timeout=120)
    out = json.loads(subprocess.run([sys.executable, "-c", COLLECT], env=env, check=True,
                                    capture_output=True, text=True, timeout=120).stdout)
    lab = json.dumps({"model_name": "tiny"})
    assert out["sglang_semipd:prefill_sms" + lab] == 40
    assert out["sglang_semipd:decode_sms" + lab] == 92
    assert abs(out["sglang_semipd:prefill_sm_share" + lab] - 40 / 132) < 1e-9
    assert out["sglang_semipd:prefill_unconfined" + lab] == 0
    assert out["sglang_semipd:resizes_total" + lab] == 1
    assert out["sglang_semipd:resize_latency_seconds_count" + lab] == 1
    assert out["sglang_semipd:slo_attainment" + lab] == 0.93
    dec = json.dumps({"model_name": "tiny", "role": "decode"}, sort_keys=True)
    assert out["sglang_semipd:iteration_seconds_count" + dec] == 1
    assert out['sglang_semipd:iteration_seconds_bucket' + json.dumps(
        {"le": "0.015", "model_name": "tiny", "role": "decode"}, sort_keys=True)] == 1


def test_the_burst_split_reads_as_all_sms(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", WRITE, "burst"], env=env, check=True, timeout=120)
    out = json.loads(subprocess.run([sys.executable, "-c", COLLECT], env=env, check=True,
                                    capture_output=True, text=True, timeout=120).stdout)
    lab = json.dumps({"model_name": "tiny"})
    assert out["sglang_semipd:prefill_sms" + lab] == 132
    assert out["sglang_semipd:decode_sms" + lab] == 28
    assert out["sglang_semipd:prefill_sm_share" + lab] == 1.0
    assert out["sglang_semipd:prefill_unconfined" + lab] == 1
