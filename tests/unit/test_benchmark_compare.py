"""The comparison driver on the CPU: systems, commands, prepared workloads, dry run."""

from __future__ import annotations

import json

from benchmark import compare
from benchmark.report import (CHUNK_SIZES, CHUNKED_PREFIX, STATIC_PREFIX, STATIC_SHARES,
                              SWEEPS, SYSTEMS)


def test_every_reported_system_has_a_run():
    named = set(compare.SYSTEM_RUNS)
    for system in SYSTEMS:
        if system == "sglang_chunked_best":
            assert {f"{CHUNKED_PREFIX}{c}" for c in CHUNK_SIZES} <= named
        elif system in SWEEPS:
            assert {f"{STATIC_PREFIX}{s:g}" for s in STATIC_SHARES} <= named
        else:
            assert system in named


def test_server_commands_share_flags_and_differ_by_system():
    cmds = {s: compare.server_command(s, "/m", "dummy", 31400) for s in compare.SYSTEM_RUNS}
    for s, cmd in cmds.items():
        assert cmd[1:3] == ["-m", compare.SYSTEM_RUNS[s][0]]
        assert " ".join(compare.COMMON_FLAGS) in " ".join(cmd)
    assert "--enable-pdmux" in cmds["sglang_pdmux"]
    assert cmds["sglang_chunked_2048"][-2:] == ["--chunked-prefill-size", "2048"]
    assert cmds["semipd_mps"][-2:] == ["--sm-partition", "mps"]
    assert cmds["semipd_green_static_0.375"][-4:] == ["--partition-policy", "static",
                                                      "--prefill-sm-share", "0.375"]


def test_prepare_then_dry_run(tmp_path, capsys):
    index = compare.prepare(tmp_path, num=12)
    assert set(index) == {"sharegpt", "azure_conv", "long"}
    for name, meta in index.items():
        lines = (tmp_path / meta["file"]).read_text().splitlines()
        assert len(lines) == meta["requests"] == len(meta["prompt_lens"])
        assert json.loads(lines[0])["messages"][0]["role"] == "user"
    compare.main(["run", "--workloads", str(tmp_path), "--model-dir", "/m", "--dry-run",
                  "--systems", "sglang_chunked_512,semipd_none,semipd_green_slo",
                  "--rates", "1,2"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("sglang_chunked_512: -m sglang.launch_server")
    assert out[1].startswith("semipd_none:") and "x 3 workloads" in out[1]
    # the SLO policy gets each workload's own (tight) targets: one server per SLO set
    slo_lines = sorted(line for line in out if line.startswith("semipd_green_slo:"))
    assert len(slo_lines) == 2
    assert "--slo-ttft-ms 2250 --slo-tpot-ms 130" in slo_lines[0]
    assert slo_lines[0].endswith("x 1 workloads x rates [1.0, 2.0]")  # long -> longbench
    assert "--slo-ttft-ms 300 --slo-tpot-ms 150" in slo_lines[1]
    assert "x 2 workloads" in slo_lines[1]  # sharegpt and azure_conv


def test_static_splits_share_one_server_pinned_in_turn(tmp_path, capsys):
    compare.prepare(tmp_path, num=12)
    statics = [f"{STATIC_PREFIX}{x:g}" for x in STATIC_SHARES]
    compare.main(["run", "--workloads", str(tmp_path), "--model-dir", "/m", "--dry-run",
                  "--systems", ",".join(["semipd_none", *statics]), "--rates", "1"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("semipd_none:")
    assert out[1].startswith(",".join(statics) + ":")  # one server, the splits in turn
    assert f"--prefill-sm-share {STATIC_SHARES[0]:g}" in out[1]
    assert compare.PINNED == {s: x for s, x in zip(statics, STATIC_SHARES)}
