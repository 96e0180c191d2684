"""benchmark.sampled_server runs a server module as ``python -m`` would, sampling its main
thread and those of the processes it starts; spawned children import the module itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent('''
    import json, multiprocessing as mp, sys, time

    def child(path):
        time.sleep(0.2)
        with open(path, "w") as f:
            json.dump({"name": __name__}, f)

    def main():
        time.sleep(0.3)
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=child, args=(sys.argv[2] + ".child",))
        p.start(); p.join(30)
        with open(sys.argv[2], "w") as f:
            json.dump({"argv": sys.argv[1:], "name": __name__, "exitcode": p.exitcode}, f)

    if __name__ == "__main__":
        main()
''')


def _run(tmp_path: Path, *args: str, samples: bool) -> subprocess.CompletedProcess:
    (tmp_path / "fake_server_mod.py").write_text(SERVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    env.pop("SGLANG_SEMIPD_STACK_SAMPLES", None)
    if samples:
        env["SGLANG_SEMIPD_STACK_SAMPLES"] = str(tmp_path / "samples")
    return subprocess.run([sys.executable, "-m", "benchmark.sampled_server", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_runs_the_module_as_main_and_samples_it(tmp_path):
    out = tmp_path / "out.json"
    proc = _run(tmp_path, "fake_server_mod", "--port", str(out), samples=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert got == {"argv": ["--port", str(out)], "name": "__main__", "exitcode": 0}
    assert json.loads((tmp_path / "out.json.child").read_text())["name"] == "__mp_main__"
    samples = tmp_path / "samples"
    assert sorted(p.name.split("-")[0] for p in samples.glob("*.json")) == ["child", "http"]
    http = json.loads(next(samples.glob("http-*.json")).read_text())
    assert http["samples"] > 0 and http["timeline"]
    # the child's main thread, sampled in the child's own process under its target's name
    dump = next(samples.glob("child-child-*.json"))
    child = json.loads(dump.read_text())
    assert child["pid"] != http["pid"] and dump.name == f"child-child-{child['pid']}.json"
    innermost = [path.split(" <- ")[0] for path, _ in child["paths"]]
    assert any(p.startswith(f"{tmp_path.name}/fake_server_mod.py:") and p.endswith(" child")
               for p in innermost), innermost


def test_without_sampling_it_only_runs_the_module(tmp_path):
    out = tmp_path / "out.json"
    proc = _run(tmp_path, "fake_server_mod", "--port", str(out), samples=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["exitcode"] == 0
    assert not (tmp_path / "samples").exists()


def test_a_missing_module_is_a_usage_error(tmp_path):
    proc = _run(tmp_path, "--port", "1", samples=False)
    assert proc.returncode != 0 and "usage" in proc.stderr
