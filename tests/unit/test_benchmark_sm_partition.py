"""``benchmark.sm_partition``'s one summary of resize latencies, shared by the green and mps
measurements."""

from benchmark.sm_partition import latency_summary


def test_latency_summary_upper_median_tail_and_empty():
    assert latency_summary([3.0, 1.0]) == {"p50": 3.0, "p99": 3.0, "max": 3.0, "n": 2}
    s = latency_summary([float(v) for v in range(200, 0, -1)])  # 1..200, unsorted
    assert (s["p50"], s["p99"], s["max"], s["n"]) == (101.0, 199.0, 200.0, 200)
    assert latency_summary([]) == {"p50": None, "p99": None, "n": 0}
