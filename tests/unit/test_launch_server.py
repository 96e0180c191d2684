"""The launcher on CPU: SGLang's real parser plus ours, exit codes, ServerArgs equivalence."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from sglang_semipd.config import add_semipd_args
from sglang_semipd.launch_server import build_parser, parse_args
from sglang_semipd.testing.model_maker import make_model

SEMIPD_FLAGS = ("--semi-pd", "--no-semi-pd", "--sm-partition", "--prefill-sm-share",
                "--sm-splits", "--partition-policy", "--slo-ttft-ms", "--slo-tpot-ms",
                "--slo-attainment", "--mps-pipe-dir")


def run_launcher(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sglang_semipd.launch_server", *argv],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def help_text() -> str:
    res = run_launcher("--help")
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_help_lists_every_sglang_flag(help_text):
    from sglang.srt.server_args import ServerArgs

    stock = argparse.ArgumentParser()
    ServerArgs.add_cli_args(stock)
    flags = {opt for a in stock._actions for opt in a.option_strings
             if a.help != argparse.SUPPRESS}
    assert len(flags) > 300
    missing = sorted(f for f in flags if f not in help_text)
    assert not missing


def test_help_lists_semipd_flags_with_help(help_text):
    section = help_text[help_text.index("semi-PD:"):]
    for flag in SEMIPD_FLAGS:
        assert flag in section
    parser = add_semipd_args(argparse.ArgumentParser())
    for action in parser._action_groups[-1]._group_actions:
        assert action.help and len(action.help) > 20, action.dest


def test_model_path_optional_and_semipd_group_present():
    parser = build_parser()
    ns = parser.parse_args(["--no-semi-pd"])
    assert ns.model_path is None and ns.semi_pd is False and ns.sm_partition == "green"


@pytest.mark.parametrize("argv,needle", [
    (("--prefill-sm-share", "1.5"), "outside the open interval (0, 1)"),
    (("--sm-partition", "mps"), "nvidia-cuda-mps-control is not on PATH"),
    (("--mps-pipe-dir", "/tmp/x", "--enable-pdmux"), "--enable-pdmux cannot be used"),
    (("--mps-pipe-dir", "/tmp/x", "--dp-size", "2"), "--dp-size cannot be used"),
])
def test_invalid_combinations_fail_at_start(argv, needle, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")  # no MPS binary, whatever this machine has
    with pytest.raises(SystemExit) as exc:
        parse_args(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "usage:" in err


def test_semipd_mode_refuses_a_pipe_dir_without_a_daemon_before_loading_anything(tmp_path):
    res = run_launcher("--mps-pipe-dir", str(tmp_path), "--model-path", str(tmp_path / "none"))
    assert res.returncode == 2
    assert "no MPS control daemon there" in res.stderr


def test_server_args_equal_stock_parsing(tmp_path):
    from sglang.srt.server_args import prepare_server_args

    from sglang_semipd.launch_server import build_server_args

    model = make_model(tmp_path / "tiny", "llama3.1-8b")  # config-only is enough to parse
    argv = ["--model-path", str(model), "--port", "1234", "--device", "cpu",
            "--random-seed", "7", "--chunked-prefill-size", "512", "--page-size", "16"]
    ns, cfg = parse_args(argv + ["--no-semi-pd", "--prefill-sm-share", "0.25"])
    ours = build_server_args(ns)
    stock = prepare_server_args(argv)
    diff = {f.name for f in dataclasses.fields(ours)
            if getattr(ours, f.name) != getattr(stock, f.name)}
    assert not diff
    assert cfg.prefill_sm_share == 0.25 and not cfg.enabled
