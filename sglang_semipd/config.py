"""Semi-PD command-line flags and the frozen :class:`SemiPDConfig` read from them.

SGLang's own flags stay SGLang's: :func:`add_semipd_args` only adds the semi-PD group to a
parser that ``ServerArgs.add_cli_args`` already filled. :meth:`SemiPDConfig.from_namespace`
reads the semi-PD flags once, at the plugin boundary, and validates them together with the
SGLang flags they interact with, so that a bad combination fails at start with one clear
message. No disk or GPU access happens here except looking the MPS binary up on ``PATH``.

This module does not import torch or SGLang.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from typing import Callable, Optional

from sglang_semipd.chunk_reserve import MAX_FRACTION

SM_PARTITION_MODES = ("green", "mps", "none")
PARTITION_POLICIES = ("slo", "static")
MPS_CONTROL_BINARY = "nvidia-cuda-mps-control"
DEFAULT_SPLITS = (0.25, 0.375, 0.5, 0.625, 0.75)
IDLE_LOANS = ("splits", "most")
# --idle-loan most: up to two more planned splits, leaving an idle prefill side one green-
# context group and an idle decode side partition.splits.MIN_DECODE_GROUPS (8 and 28 SMs on
# the H100; partition.splits.plan_splits rounds these shares to them)
LOAN_SHARES = (1e-3, 1.0 - 1e-3)

# SGLang features that semi-PD cannot combine with (flag -> why), checked on the namespace.
_INCOMPATIBLE: tuple[tuple[str, Callable[[argparse.Namespace], bool], str], ...] = (
    ("--disaggregation-mode",
     lambda ns: getattr(ns, "disaggregation_mode", "null") not in (None, "null"),
     "semi-PD already disaggregates prefill and decode on the same GPU"),
    ("--enable-pdmux", lambda ns: bool(getattr(ns, "enable_pdmux", False)),
     "PD multiplexing is SGLang's single-process alternative to semi-PD"),
    ("--dp-size", lambda ns: (getattr(ns, "dp_size", 1) or 1) > 1,
     "run one semi-PD server per replica behind sglang's router instead"),
    ("--pp-size", lambda ns: (getattr(ns, "pp_size", 1) or 1) > 1,
     "pipeline parallelism is not supported by semi-PD"),
    ("--speculative-algorithm", lambda ns: bool(getattr(ns, "speculative_algorithm", None)),
     "speculative decoding is not supported by semi-PD yet"),
    ("--weight-cache-mode",
     lambda ns: getattr(ns, "weight_cache_mode", "off") not in (None, "off"),
     "semi-PD's memory manager owns the weight cache itself"),
)


# SGLang 0.5.17's deterministic inference (Scheduler.init_deterministic_inference_config) cuts
# prefill chunks only at multiples of a per-backend size; with --chunked-prefill-size below it,
# PrefillAdder.add_one_req never admits a prompt longer than the chunk and the server waits
# forever (benchmark.correctness sets the variable for that reason; a GPU test's stock server
# hung on it on the H200, session 15). Backend -> (environment variable, SGLang's default).
DETERMINISTIC_CHUNK_ALIGN: dict[str, tuple[str, int]] = {
    "triton": ("SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE", 4096),
    "flashinfer": ("SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE", 4096),
}


def _deterministic_chunk_problem(ns: argparse.Namespace) -> Optional[str]:
    """Why ``ns``'s chunked prefill can never admit a long prompt, or None."""
    if not getattr(ns, "enable_deterministic_inference", False):
        return None
    align = DETERMINISTIC_CHUNK_ALIGN.get(getattr(ns, "attention_backend", None) or "")
    chunk = getattr(ns, "chunked_prefill_size", None)
    if align is None or chunk is None or chunk <= 0:
        return None
    env, default = align
    try:
        size = int(os.environ.get(env, default))
    except ValueError:
        return None  # SGLang reports its own environment variables
    if chunk >= size:
        return None
    return (f"--chunked-prefill-size {chunk} is below {env}={size}: with "
            f"--enable-deterministic-inference and --attention-backend "
            f"{ns.attention_backend}, SGLang only cuts prefill chunks at multiples of it, so a "
            f"prompt longer than {chunk} tokens would wait forever; raise the chunk size or "
            f"set {env}={chunk}")


class SemiPDConfigError(ValueError):
    """A semi-PD flag, or a combination with an SGLang flag, that cannot work."""


def _float_in(lo: float, hi: float, hi_inclusive: bool, what: str,
              lo_inclusive: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` accepting a float in (lo, hi), (lo, hi], [lo, hi) or [lo, hi]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
        if not (lo < value < hi or (hi_inclusive and value == hi)
                or (lo_inclusive and value == lo)):
            raise argparse.ArgumentTypeError(f"{value} {what}")
        return value
    return parse


_share = _float_in(0.0, 1.0, False, "is outside the open interval (0, 1)")
_positive_ms = _float_in(0.0, float("inf"), False, "ms is not a positive duration")
_attainment = _float_in(0.0, 1.0, True, "is outside (0, 1]")
_chunk_reserve = _float_in(0.0, MAX_FRACTION, True, f"is outside [0, {MAX_FRACTION}]",
                           lo_inclusive=True)


def _splits(text: str) -> tuple[float, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("needs at least one prefill share")
    values = tuple(sorted({_share(p) for p in parts}))
    return values


def _decode_overlap(ns: argparse.Namespace) -> bool:
    """``--decode-overlap`` as given, else SGLang's own overlap setting (on unless
    ``--disable-overlap-schedule``)."""
    given = getattr(ns, "decode_overlap", None)
    if given is not None:
        return bool(given)
    return not getattr(ns, "disable_overlap_schedule", False)


def _partition_policy(ns: argparse.Namespace) -> str:
    """``--partition-policy`` as given, else ``slo`` under ``green`` and ``static`` under
    ``mps`` / ``none``. The SLO policy resizes green contexts between iterations; under ``mps``
    a resize starts a standby worker pair (tens of seconds) and under ``none`` there is no
    split, so an explicit ``slo`` there is refused rather than silently pinned."""
    given = getattr(ns, "partition_policy", None)
    mode = getattr(ns, "sm_partition", "green")
    if given is None:
        return "slo" if mode == "green" else "static"
    if given == "slo" and mode != "green" and getattr(ns, "semi_pd", True):
        raise SemiPDConfigError(
            f"--partition-policy slo needs --sm-partition green (it resizes green contexts "
            f"between iterations); under --sm-partition {mode} the split stays at "
            "--prefill-sm-share" + (" (resize it through /set_internal_state: a standby "
                                    "worker pair is started)" if mode == "mps" else "")
            + ": pass --partition-policy static or leave the flag out")
    return given


def add_semipd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the semi-PD flag group to ``parser`` (which already holds SGLang's flags)."""
    g = parser.add_argument_group("semi-PD", "sglang-semipd: prefill and decode workers "
                                  "sharing one GPU, one KV pool and one copy of the weights")
    g.add_argument("--semi-pd", action=argparse.BooleanOptionalAction, default=True,
                   help="Serve the semi-PD way (default); --no-semi-pd runs stock "
                        "sglang.launch_server with the same flags.")
    g.add_argument("--sm-partition", choices=SM_PARTITION_MODES, default="green",
                   help="How workers split the SMs: green contexts under MPS (default; "
                        "resized between iterations), MPS thread percentages (the paper's "
                        "mechanism; a resize starts a standby worker pair and swaps it in), "
                        "or none (both on all SMs under MPS).")
    g.add_argument("--prefill-sm-share", type=_share, default=0.5,
                   help="Starting fraction of the SMs for the prefill worker, in (0, 1).")
    g.add_argument("--sm-splits", type=_splits, default=DEFAULT_SPLITS,
                   help="Comma-separated prefill shares the partitioner may switch between "
                        "(decode gets the rest, at least three green-context groups: a share "
                        "past that maps to the most prefill-heavy split left, 104/28 on an "
                        "H100); one set of decode CUDA graphs each.")
    g.add_argument("--partition-policy", choices=PARTITION_POLICIES, default=None,
                   help="slo: resize the split to meet the TTFT/TPOT targets (green only, "
                        "the default there); static: keep --prefill-sm-share (the default, "
                        "and the only policy, under mps and none).")
    g.add_argument("--slo-ttft-ms", type=_positive_ms, default=1000.0,
                   help="Time-to-first-token target in milliseconds (P90 by default).")
    g.add_argument("--slo-tpot-ms", type=_positive_ms, default=100.0,
                   help="Time-per-output-token target in milliseconds.")
    g.add_argument("--slo-attainment", type=_attainment, default=0.9,
                   help="Fraction of requests that must meet both SLOs, in (0, 1].")
    g.add_argument("--idle-loan", choices=IDLE_LOANS, default="splits",
                   help="What an idle side lends the busy one under the SLO policy (green): "
                        "'splits' (default) moves to the most lopsided of --sm-splits; 'most' "
                        "keeps an idle prefill side one green-context group (8 SMs) and an "
                        "idle decode side three (28 SMs on an H100, the fewest its CUDA graphs "
                        "were captured on) and lends the rest (up to two more splits, with "
                        "their decode CUDA graphs, used for loans only).")
    g.add_argument("--decode-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="Run the decode worker on SGLang's overlap scheduler (CPU work of the "
                        "next step overlaps the GPU's current one; its KV frees wait for the "
                        "forward in flight). Default: on unless --disable-overlap-schedule, "
                        "like SGLang's own scheduler. The prefill worker's is "
                        "--prefill-overlap.")
    g.add_argument("--prefill-overlap", action=argparse.BooleanOptionalAction, default=False,
                   help="Run the prefill worker on SGLang's overlap scheduler too: the next "
                        "prefill batch is launched before the last one's results are handled "
                        "(its hand-off, first tokens, memory-manager calls). Default off: on "
                        "the H100 it did not improve attainment or throughput.")
    g.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="Let the prefill worker replay SGLang's prefill CUDA graphs (SGLang's "
                        "own default for stock Llama-type models, off for MLA), captured once "
                        "per split on its green stream as decode's are. Default off: it costs "
                        "start-up time and GPU memory per split (8B shape on an H100: 21 s, "
                        "1.9 GiB) and the headline benchmark ran without it; without it "
                        "prefills run eagerly.")
    g.add_argument("--burst-unconfined", action=argparse.BooleanOptionalAction, default=False,
                   help="Under the SLO policy (green): once the expected wait for a first "
                        "token (the oldest request's wait so far plus the time to prefill "
                        "every waiting prompt at the prefill worker's measured speed on its "
                        "split) reaches half the TTFT target, let the prefill worker run on all "
                        "SMs (sharing the decode worker's, as --sm-partition none does; decode "
                        "stays on the most prefill-heavy split's SMs) until it is below a "
                        "quarter of it on the split left, for at most 2 s, then return to the "
                        "policy's split. Default off: on an H100 it raised attainment of "
                        "the TTFT/TPOT targets, but decode steps during a burst took "
                        "1.2-2.9x as long, which a tight inter-token-latency target does not "
                        "allow.")
    g.add_argument("--eager-loan", action=argparse.BooleanOptionalAction, default=False,
                   help="Under the SLO policy (green): lend the prefill side's SMs to decode "
                        "(the --idle-loan split) as soon as no request waits for its first "
                        "token while others decode, not only after a whole idle second; the "
                        "next request takes them back. Default off: on an H100 (ShareGPT) it "
                        "cut decode's mean TPOT by 15-25% and changed no TTFT/TPOT "
                        "attainment, and its GPU test has not passed yet.")
    g.add_argument("--batch-handoff", action=argparse.BooleanOptionalAction, default=False,
                   help="Hand each prefill batch to the decode worker in one memory-manager "
                        "call (its prompts cached, locks and rows moved) instead of 2-4 calls "
                        "per request. Default off: on the H100 it was correct but no faster.")
    g.add_argument("--prefill-chunk-reserve", type=_chunk_reserve, default=0.0,
                   metavar="F",
                   help="While a long prompt is prefilled in chunks, hold up to this fraction "
                        "of each chunk's token budget (--chunked-prefill-size) back for the "
                        "waiting prompts that fit in it whole, so they are prefilled with "
                        "the next chunk instead of after the last one. 0 (default): SGLang's "
                        "order, the chunked prompt first with the whole budget. Ignored "
                        "with --enable-deterministic-inference (chunk boundaries would "
                        "differ from stock SGLang's).")
    g.add_argument("--mps-pipe-dir", default=None,
                   help="Use the running MPS control daemon of this CUDA_MPS_PIPE_DIRECTORY "
                        "instead of starting a private one.")
    return parser


@dataclasses.dataclass(frozen=True)
class SemiPDConfig:
    """The semi-PD settings of one server, read once from the command line."""

    enabled: bool = True
    sm_partition: str = "green"
    prefill_sm_share: float = 0.5
    sm_splits: tuple[float, ...] = DEFAULT_SPLITS
    partition_policy: str = "slo"
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0
    slo_attainment: float = 0.9
    mps_pipe_dir: Optional[str] = None
    decode_overlap: bool = True
    idle_loan: str = "splits"
    batch_handoff: bool = False
    prefill_chunk_reserve: float = 0.0
    prefill_overlap: bool = False
    prefill_graphs: bool = False
    burst_unconfined: bool = False
    eager_loan: bool = False

    @property
    def decode_sm_share(self) -> float:
        return 1.0 - self.prefill_sm_share

    @property
    def plans_loan_splits(self) -> bool:
        """``--idle-loan most`` under green: the loans go to the extreme planned splits, those
        that are no ``--sm-splits`` split serve loans only
        (:func:`~sglang_semipd.partition.splits.loan_and_base_fractions`)."""
        return self.idle_loan == "most" and self.sm_partition == "green"

    @property
    def planned_shares(self) -> tuple[float, ...]:
        """The prefill shares the workers build streams and decode graphs for:
        ``--sm-splits``, plus :data:`LOAN_SHARES` when :attr:`plans_loan_splits`."""
        if self.plans_loan_splits:
            return tuple(sorted(set(self.sm_splits) | set(LOAN_SHARES)))
        return self.sm_splits

    @property
    def starts_private_mps(self) -> bool:
        """True when the launcher must start (and later stop) its own MPS daemon."""
        return self.enabled and self.mps_pipe_dir is None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace,
                       which: Callable[[str], Optional[str]] = shutil.which) -> "SemiPDConfig":
        """Read and validate; raises :class:`SemiPDConfigError` with a one-line reason."""
        cfg = cls(enabled=ns.semi_pd, sm_partition=ns.sm_partition,
                  prefill_sm_share=ns.prefill_sm_share, sm_splits=tuple(ns.sm_splits),
                  partition_policy=_partition_policy(ns), slo_ttft_ms=ns.slo_ttft_ms,
                  slo_tpot_ms=ns.slo_tpot_ms, slo_attainment=ns.slo_attainment,
                  mps_pipe_dir=ns.mps_pipe_dir,
                  decode_overlap=_decode_overlap(ns),
                  idle_loan=getattr(ns, "idle_loan", "splits"),
                  batch_handoff=bool(getattr(ns, "batch_handoff", False)),
                  prefill_overlap=bool(getattr(ns, "prefill_overlap", False)),
                  prefill_graphs=bool(getattr(ns, "prefill_graphs", False)),
                  burst_unconfined=bool(getattr(ns, "burst_unconfined", False)),
                  eager_loan=bool(getattr(ns, "eager_loan", False)),
                  prefill_chunk_reserve=float(getattr(ns, "prefill_chunk_reserve", 0.0)))
        cfg.validate(ns, which)
        return cfg

    def validate(self, ns: Optional[argparse.Namespace] = None,
                 which: Callable[[str], Optional[str]] = shutil.which) -> None:
        """Check this config (and, given ``ns``, the SGLang flags it must coexist with)."""
        if self.sm_partition not in SM_PARTITION_MODES:
            raise SemiPDConfigError(f"--sm-partition must be one of {SM_PARTITION_MODES}")
        if not 0.0 < self.prefill_sm_share < 1.0:
            raise SemiPDConfigError(
                f"--prefill-sm-share {self.prefill_sm_share} is outside (0, 1)")
        if self.partition_policy not in PARTITION_POLICIES:
            raise SemiPDConfigError(f"--partition-policy must be one of {PARTITION_POLICIES}")
        if self.idle_loan not in IDLE_LOANS:
            raise SemiPDConfigError(f"--idle-loan must be one of {IDLE_LOANS}")
        if not 0.0 <= self.prefill_chunk_reserve <= MAX_FRACTION:
            raise SemiPDConfigError(f"--prefill-chunk-reserve {self.prefill_chunk_reserve} "
                                    f"is outside [0, {MAX_FRACTION}]")
        problem = _deterministic_chunk_problem(ns) if ns is not None else None
        if problem:  # stock SGLang (--no-semi-pd) hangs the same way: refused for both
            raise SemiPDConfigError(problem)
        if not self.enabled:
            return
        for flag, asked, why in (
                ("--burst-unconfined", self.burst_unconfined,
                 "the SLO controller moves the prefill worker off its green context"),
                ("--eager-loan", self.eager_loan, "the SLO policy's loans move green splits")):
            if asked and (self.sm_partition != "green" or self.partition_policy != "slo"):
                raise SemiPDConfigError(
                    f"{flag} needs --sm-partition green and --partition-policy slo ({why}), "
                    f"not --sm-partition {self.sm_partition} --partition-policy "
                    f"{self.partition_policy}")
        self._check_mps(which)
        if ns is not None:
            for flag, bad, why in _INCOMPATIBLE:
                if bad(ns):
                    raise SemiPDConfigError(f"{flag} cannot be used with --semi-pd: {why} "
                                            "(or pass --no-semi-pd for stock SGLang)")
        for flag, asked in (("--decode-overlap", self.decode_overlap),
                            ("--prefill-overlap", self.prefill_overlap)):
            if asked and ns is not None and getattr(ns, "disable_overlap_schedule", False):
                raise SemiPDConfigError(f"{flag} asks for SGLang's overlap scheduler, which "
                                        "--disable-overlap-schedule turns off: pass one of them")
        if self.mps_pipe_dir is not None and \
                not os.path.exists(os.path.join(self.mps_pipe_dir, "control")):
            raise SemiPDConfigError(f"--mps-pipe-dir {self.mps_pipe_dir}: no MPS control daemon "
                                    "there (no 'control' pipe); start one with "
                                    f"CUDA_MPS_PIPE_DIRECTORY={self.mps_pipe_dir} "
                                    f"{MPS_CONTROL_BINARY} -d, or leave the flag out")

    def _check_mps(self, which: Callable[[str], Optional[str]]) -> None:
        # Two processes only overlap on one GPU under MPS (ARCHITECTURE.md section 3), so
        # every semi-PD mode needs a daemon: ours, or the one named by --mps-pipe-dir.
        if self.mps_pipe_dir is not None or which(MPS_CONTROL_BINARY) is not None:
            return
        mode = "mps" if self.sm_partition == "mps" else self.sm_partition
        raise SemiPDConfigError(
            f"--sm-partition {mode} needs CUDA MPS, but {MPS_CONTROL_BINARY} is not on PATH; "
            "install the CUDA MPS binaries, pass --mps-pipe-dir of a running daemon, "
            "or use --no-semi-pd")
