"""Semi-PD flags: parsing and validation on a bare parser (no SGLang, no torch)."""

from __future__ import annotations

import argparse

import pytest

from sglang_semipd.config import (DEFAULT_SPLITS, LOAN_SHARES, MPS_CONTROL_BINARY,
                                  SemiPDConfig, SemiPDConfigError, add_semipd_args)


def has_mps(name: str):
    return "/usr/bin/" + name


def no_mps(name: str):
    return None


def parse(*argv: str, which=has_mps, **sglang_ns) -> SemiPDConfig:
    ns = add_semipd_args(argparse.ArgumentParser()).parse_args(list(argv))
    for key, value in sglang_ns.items():
        setattr(ns, key, value)
    return SemiPDConfig.from_namespace(ns, which=which)


def test_defaults():
    cfg = parse()
    assert cfg == SemiPDConfig()
    assert cfg.enabled and cfg.sm_partition == "green" and cfg.prefill_sm_share == 0.5
    assert cfg.sm_splits == DEFAULT_SPLITS and cfg.partition_policy == "slo"
    assert cfg.decode_sm_share == pytest.approx(0.5)
    assert cfg.starts_private_mps


def test_every_flag_is_read():
    cfg = parse("--no-semi-pd", "--sm-partition", "mps", "--prefill-sm-share", "0.3",
                "--sm-splits", "0.7,0.3,0.5,0.3", "--partition-policy", "static",
                "--slo-ttft-ms", "300", "--slo-tpot-ms", "150", "--slo-attainment", "0.95",
                "--mps-pipe-dir", "/tmp/mps", "--decode-overlap", "--idle-loan", "most",
                "--batch-handoff", "--prefill-overlap", "--prefill-chunk-reserve", "0.5")
    assert cfg == SemiPDConfig(enabled=False, sm_partition="mps", prefill_sm_share=0.3,
                               sm_splits=(0.3, 0.5, 0.7), partition_policy="static",
                               slo_ttft_ms=300.0, slo_tpot_ms=150.0, slo_attainment=0.95,
                               mps_pipe_dir="/tmp/mps", decode_overlap=True, idle_loan="most",
                               batch_handoff=True, prefill_overlap=True,
                               prefill_chunk_reserve=0.5)
    assert not cfg.starts_private_mps


@pytest.mark.parametrize("argv", [
    ("--prefill-sm-share", "0"), ("--prefill-sm-share", "1"), ("--prefill-sm-share", "1.5"),
    ("--prefill-sm-share", "-0.2"), ("--prefill-sm-share", "half"),
    ("--sm-partition", "cu-mask"), ("--partition-policy", "magic"),
    ("--slo-ttft-ms", "0"), ("--slo-tpot-ms", "-5"), ("--slo-attainment", "1.2"),
    ("--sm-splits", "0.5,1.0"), ("--sm-splits", ","), ("--idle-loan", "all"),
    ("--prefill-chunk-reserve", "0.95"), ("--prefill-chunk-reserve", "-0.1"),
    ("--prefill-chunk-reserve", "half"),
])
def test_bad_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err


@pytest.mark.parametrize("mode", ["green", "mps", "none"])
def test_semipd_needs_mps_binary(mode):
    with pytest.raises(SemiPDConfigError, match=MPS_CONTROL_BINARY) as exc:
        parse("--sm-partition", mode, which=no_mps)
    assert f"--sm-partition {mode}" in str(exc.value)


def test_mps_not_needed_with_existing_daemon_or_without_semipd(tmp_path):
    (tmp_path / "control").touch()  # where a running daemon keeps its control pipe
    assert parse("--sm-partition", "mps", "--mps-pipe-dir", str(tmp_path), which=no_mps).enabled
    assert not parse("--no-semi-pd", "--sm-partition", "mps", which=no_mps).enabled


def test_pipe_dir_without_a_daemon_is_refused(tmp_path):
    with pytest.raises(SemiPDConfigError, match="no MPS control daemon there"):
        parse("--mps-pipe-dir", str(tmp_path), which=no_mps)


@pytest.mark.parametrize("field,value,flag", [
    ("disaggregation_mode", "prefill", "--disaggregation-mode"),
    ("enable_pdmux", True, "--enable-pdmux"),
    ("dp_size", 2, "--dp-size"),
    ("pp_size", 2, "--pp-size"),
    ("speculative_algorithm", "EAGLE", "--speculative-algorithm"),
    ("weight_cache_mode", "daemon", "--weight-cache-mode"),
])
def test_incompatible_sglang_flags(field, value, flag):
    with pytest.raises(SemiPDConfigError, match=flag):
        parse(**{field: value})
    assert not parse("--no-semi-pd", **{field: value}).enabled  # stock SGLang takes them


def test_compatible_sglang_values_pass():
    cfg = parse(disaggregation_mode="null", enable_pdmux=False, dp_size=1, pp_size=1,
                speculative_algorithm=None, weight_cache_mode="off")
    assert cfg.enabled


def test_decode_overlap_follows_sglangs_overlap_setting_unless_given():
    assert parse().decode_overlap and parse(disable_overlap_schedule=False).decode_overlap
    assert not parse(disable_overlap_schedule=True).decode_overlap
    assert not parse("--no-decode-overlap").decode_overlap
    assert parse("--decode-overlap", disable_overlap_schedule=False).decode_overlap
    with pytest.raises(SemiPDConfigError, match="--disable-overlap-schedule"):
        parse("--decode-overlap", disable_overlap_schedule=True)
    assert not parse("--no-decode-overlap", disable_overlap_schedule=True).decode_overlap


def test_prefill_chunk_reserve_is_off_unless_asked():
    assert parse().prefill_chunk_reserve == 0.0
    assert parse("--prefill-chunk-reserve", "0.9").prefill_chunk_reserve == 0.9
    with pytest.raises(SemiPDConfigError, match="--prefill-chunk-reserve"):
        SemiPDConfig(prefill_chunk_reserve=1.0).validate()


def test_batch_handoff_and_prefill_overlap_are_off_unless_asked():
    assert not parse().batch_handoff and parse("--batch-handoff").batch_handoff
    assert not parse("--no-batch-handoff").batch_handoff
    assert not parse().prefill_overlap and parse("--prefill-overlap").prefill_overlap
    assert not parse().prefill_graphs and parse("--prefill-graphs").prefill_graphs
    assert not parse("--no-prefill-graphs").prefill_graphs
    with pytest.raises(SemiPDConfigError, match="--prefill-overlap.*--disable-overlap"):
        parse("--prefill-overlap", disable_overlap_schedule=True)


def test_eager_loans_are_off_unless_asked_and_need_green_and_the_slo_policy():
    assert not parse().eager_loan and parse("--eager-loan").eager_loan
    assert not parse("--no-eager-loan").eager_loan
    assert parse("--eager-loan", "--idle-loan", "most").eager_loan
    for argv in (("--sm-partition", "none"), ("--sm-partition", "mps"),
                 ("--partition-policy", "static")):
        with pytest.raises(SemiPDConfigError, match="--eager-loan needs --sm-partition green"):
            parse("--eager-loan", *argv)
    assert not parse("--no-semi-pd", "--eager-loan", "--sm-partition", "none").enabled


def test_idle_loan_most_plans_two_loan_splits_under_green_only():
    assert parse().idle_loan == "splits" and parse().planned_shares == DEFAULT_SPLITS
    most = parse("--idle-loan", "most")
    assert most.planned_shares == (LOAN_SHARES[0], *DEFAULT_SPLITS, LOAN_SHARES[1])
    assert parse("--idle-loan", "most", "--sm-partition", "mps").planned_shares == DEFAULT_SPLITS
    with pytest.raises(SemiPDConfigError, match="--idle-loan"):
        SemiPDConfig(idle_loan="all").validate(which=has_mps)


def test_validate_direct_construction():
    with pytest.raises(SemiPDConfigError, match="outside"):
        SemiPDConfig(prefill_sm_share=1.0).validate(which=has_mps)
    with pytest.raises(SemiPDConfigError, match="--sm-partition"):
        SemiPDConfig(sm_partition="x").validate(which=has_mps)


def test_every_flag_of_the_group_is_a_config_field():
    import dataclasses

    parser = add_semipd_args(argparse.ArgumentParser())
    group = next(g for g in parser._action_groups if g.title == "semi-PD")
    dests = {a.dest for a in group._group_actions}
    fields = {f.name for f in dataclasses.fields(SemiPDConfig)}
    assert dests == (fields - {"enabled"}) | {"semi_pd"}


def test_config_module_imports_without_torch_or_sglang():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['sglang'] = None\n"
            "import sglang_semipd, sglang_semipd.config\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_runtime_policy_switch_names_every_partition_policy():
    """``/set_internal_state {"semipd_slo_policy": 0|1}`` (numbers: SGLang's request type
    refuses strings) maps onto exactly the policies of ``--partition-policy``."""
    from sglang_semipd.config import PARTITION_POLICIES
    from sglang_semipd.workers import POLICY_BY_SWITCH

    assert sorted(POLICY_BY_SWITCH.values()) == sorted(PARTITION_POLICIES)
    assert set(POLICY_BY_SWITCH) == {0, 1}


@pytest.mark.parametrize("mode,policy", [("green", "slo"), ("mps", "static"), ("none", "static")])
def test_partition_policy_defaults_to_what_the_mode_can_run(mode, policy):
    assert parse("--sm-partition", mode).partition_policy == policy
    assert parse("--sm-partition", mode, "--partition-policy", "static").partition_policy \
        == "static"


@pytest.mark.parametrize("mode", ["mps", "none"])
def test_an_explicit_slo_policy_without_green_contexts_is_refused(mode):
    with pytest.raises(SemiPDConfigError, match=f"--sm-partition {mode}") as exc:
        parse("--sm-partition", mode, "--partition-policy", "slo")
    assert "--partition-policy static" in str(exc.value)
    assert ("/set_internal_state" in str(exc.value)) == (mode == "mps")
    # stock SGLang ignores the semi-PD flags
    assert not parse("--no-semi-pd", "--sm-partition", mode, "--partition-policy", "slo").enabled


@pytest.mark.parametrize("backend,env", [("triton", "SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE"),
                                         ("flashinfer", "SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE")])
def test_deterministic_chunks_below_sglangs_alignment_are_refused(monkeypatch, backend, env):
    monkeypatch.delenv(env, raising=False)
    small = dict(enable_deterministic_inference=True, attention_backend=backend,
                 chunked_prefill_size=128)
    for semi_pd in ("--semi-pd", "--no-semi-pd"):  # stock SGLang waits forever too
        with pytest.raises(SemiPDConfigError, match=f"{env}=4096.*{env}=128"):
            parse(semi_pd, **small)
    monkeypatch.setenv(env, "128")  # chunks aligned to 128: SGLang admits them
    assert parse(**small).enabled
    monkeypatch.setenv(env, "256")
    with pytest.raises(SemiPDConfigError, match="below"):
        parse(**small)
    monkeypatch.delenv(env)
    for ok in (dict(small, chunked_prefill_size=4096), dict(small, chunked_prefill_size=-1),
               dict(small, chunked_prefill_size=None),
               dict(small, enable_deterministic_inference=False),
               dict(small, attention_backend="fa3"), dict(small, attention_backend=None)):
        assert parse(**ok).enabled, ok
