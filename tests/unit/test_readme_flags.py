"""The README documents every flag semi-PD adds to ``sglang.launch_server`` (the brief asks
for it): each option string of ``config.add_semipd_args`` appears in the README's flag table."""

from __future__ import annotations

import argparse
from pathlib import Path

from sglang_semipd.config import add_semipd_args

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_semipd_flag_has_a_row_in_the_readme():
    parser = add_semipd_args(argparse.ArgumentParser())
    flags = [opt for action in parser._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"]
    assert "--burst-unconfined" in flags and len(flags) > 10
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `--")]
    missing = [f for f in flags  # a row names it in backticks, alone or with its argument
               if not any(f"`{f}`" in row or f"`{f} " in row for row in rows)]
    assert not missing, f"flags without a README row: {missing}"
