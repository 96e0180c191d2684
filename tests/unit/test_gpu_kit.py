"""The GPU-host kit's shell scripts: syntax, and activation against a small real archive."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tuple(sorted(p.name for p in (REPO / "scripts").glob("*.sh")))


@pytest.mark.parametrize("name", SCRIPTS)
def test_shell_syntax(name):
    subprocess.run(["bash", "-n", str(REPO / "scripts" / name)], check=True)


def test_bundle_recipe_pins_sglang_and_trims_kernels():
    text = (REPO / "scripts" / "build_gpu_bundle.sh").read_text()
    assert "sglang==0.5.17" in text and "sglang-kernel==0.4.5" in text
    for dropped in ("flash_ops", "sm100", "infllm_ops", "flashmla_ops"):
        assert dropped in text
    assert "build_project_wheel" in text


def _fake_bundle(root: Path) -> Path:
    kit = root / ".gpu"
    kit.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        data = b"VALUE = 41\n"
        info = tarfile.TarInfo("site/fakepkg/__init__.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = kit / "sglang-0.0.0-py312-site.tar.xz"
    archive.write_bytes(buf.getvalue())
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (kit / "sglang-0.0.0-py312-site.manifest").write_text(f"recipe x\nsha256 {digest}\n")
    with zipfile.ZipFile(kit / "sglang_semipd-9.9-py3-none-any.whl", "w") as whl:
        whl.writestr("semipd_probe/__init__.py", "VALUE = 1\n")
    return kit


def _activate_and_import(kit: Path, site_root: Path) -> subprocess.CompletedProcess[str]:
    script = (f"export SGLANG_SITE_ROOT={site_root}; "
              f"source {REPO / 'scripts' / 'gpu_activate.sh'} {kit} || exit 9; "
              f"{sys.executable} -c 'import fakepkg, semipd_probe; "
              "print(fakepkg.VALUE + semipd_probe.VALUE)'; echo offline=$HF_HUB_OFFLINE")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_activation_unpacks_once_and_sets_paths(tmp_path):
    kit, root = _fake_bundle(tmp_path), tmp_path / "site-root"
    first = _activate_and_import(kit, root)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["42", "offline=1"]
    assert "unpacking" in first.stderr
    second = _activate_and_import(kit, root)
    assert second.stdout.split() == ["42", "offline=1"]
    assert "unpacking" not in second.stderr  # the stamp matched: no second unpack


def test_activation_without_archive_fails(tmp_path):
    res = subprocess.run(["bash", "-c", f"source {REPO / 'scripts' / 'gpu_activate.sh'} "
                          f"{tmp_path}"], capture_output=True, text=True)
    assert res.returncode != 0 and "no sglang-*-site.tar.xz" in res.stderr


def test_step_timeouts_are_cut_to_what_is_left_of_the_call(tmp_path):
    """A step's timeout never runs past the device call's limit less the kill grace and
    the exit packing (else the call is cut and nothing comes back)."""
    # a stopped clock: a second ticking between the source and `budget 80` made it 49
    script = (f"source scripts/gpu_common.sh {tmp_path}/res >/dev/null; "
              "date() { echo 1000; }; T0=1000; CALL_LIMIT_S=100; "
              "echo $(budget 30) $(budget 80); CALL_LIMIT_S=10; echo $(budget 5)")
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "OUT": str(tmp_path / "res")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["30", "50", "1"]
    assert "step timeout 80 s cut to 50 s" in out.stderr
    assert (tmp_path / "res" / "timings.txt").exists()  # the exit trap still packs results


def test_a_file_split_into_pieces_joins_back_once_every_piece_is_there(tmp_path):
    """scripts/gpu_default_model_pieces.sh: split here, join on the host (from the
    repository root there; here a temporary directory)."""
    script = str(REPO / "scripts" / "gpu_default_model_pieces.sh")
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(2_500_000))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "SRC": str(src), "SGLANG_SEMIPD_CACHE": str(tmp_path / "cache")}
    subprocess.run(["bash", script, "split", "1", "1"], cwd=work, env=env, check=True,
                   capture_output=True)
    sizes = [p.stat().st_size for p in sorted(work.glob(".gpu_part*/*.part*"))]
    assert sizes == [1_000_000, 1_000_000, 500_000]
    piece3 = next(work.glob(".gpu_part3/*.part3"))
    hidden = piece3.rename(tmp_path / piece3.name)  # not on the host yet
    out = subprocess.run(["bash", script, "join"], cwd=work, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 1 and "piece 3 of 3 not on this host yet" in out.stdout
    hidden.rename(piece3)
    subprocess.run(["bash", script, "join"], cwd=work, env=env, check=True, capture_output=True)
    joined = tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert joined.read_bytes() == src.read_bytes()
    again = subprocess.run(["bash", script, "join"], cwd=work, env=env, check=True,
                           capture_output=True, text=True)
    assert "already joined" in again.stdout


def test_travel_size_counts_the_tree_git_keeps_and_the_carried_paths(tmp_path):
    """``scripts/travel_size.py``: tracked and untracked-not-ignored files plus the carried
    paths, not other ignored files; exit 1 over the device tool's 64 MiB."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_bytes(b"x" * 1000)
    (repo / "new.txt").write_bytes(b"y" * 300)  # untracked, not ignored: travels
    (repo / ".gitignore").write_text(".kit/\nbig.bin\n")
    (repo / "big.bin").write_bytes(b"z" * 5000)  # ignored, not carried: stays
    (repo / ".kit").mkdir()
    (repo / ".kit" / "bundle").write_bytes(b"k" * 2000)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "pkg", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import travel_size
    finally:
        sys.path.remove(str(REPO / "scripts"))
    sizes = travel_size.travel_sizes(repo, [".kit"])
    assert sizes == {"tree:pkg": 1000, "tree:new.txt": 300, "tree:.gitignore": 14,
                     "carry:.kit": 2000}
    script = [sys.executable, str(REPO / "scripts" / "travel_size.py"), "--repo", str(repo)]
    ok = subprocess.run([*script, ".kit"], capture_output=True, text=True)
    assert ok.returncode == 0 and "fits" in ok.stdout
    (repo / ".kit" / "huge").write_bytes(b"\0" * (64 * 2**20))
    over = subprocess.run([*script, ".kit"], capture_output=True, text=True)
    assert over.returncode == 1 and "OVER" in over.stdout
