"""scripts/install.sh as a new user runs it: only ``python3`` on PATH (no ``python``), into a venv it makes,
never writing to the interpreter it was made from.

Cheap on purpose: the packages of the environment running the tests are on the venv's PYTHONPATH, as the
system's packages are for the --system-site-packages venv the script makes, so pip finds everything already
installed and downloads at most the build backend (setuptools) for the editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install.sh"
TOOLS = ("bash", "dirname", "realpath", "rm")  # what the script itself calls, besides python3


def _bin_dir(tmp_path: Path, python3: bool = True) -> Path:
    """A PATH of one folder: the script's few tools and, if asked, ``python3`` -- no ``python``."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), d / tool)
    if python3:
        os.symlink(sys._base_executable, d / "python3")  # the base interpreter, as a system's python3
    return d


def _env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    return dict(env, PATH=str(bin_dir), PYTHONPATH=os.pathsep.join(site_dirs), **extra)


def _listing(d: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in d.iterdir()}


def test_install_sh_with_python3_alone_makes_a_venv_and_leaves_the_interpreter_alone(tmp_path):
    bin_dir = _bin_dir(tmp_path)
    assert shutil.which("python", path=str(bin_dir)) is None
    base_site = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])
    before = _listing(base_site)
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, bin_dir, LLMPRUNE_VENV=str(venv)),
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f". {venv}/bin/activate" in proc.stdout  # says how to use it
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    assert _listing(base_site) == before  # pip wrote into the venv only
    env = _env(tmp_path, bin_dir)
    cli = subprocess.run([str(venv / "bin" / "llmprune"), "--help"], env=env, capture_output=True, text=True)
    assert cli.returncode == 0 and cli.stdout.startswith("Usage: llmprune"), cli.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import llmprune; print(llmprune.__file__)"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == ROOT / "llmprune" / "__init__.py"  # this checkout, editable


def test_install_sh_without_python3_says_what_is_missing(tmp_path):
    bin_dir = _bin_dir(tmp_path, python3=False)
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, bin_dir, LLMPRUNE_VENV=str(venv)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "python3 (3.11 or newer) is needed" in proc.stderr
    assert not venv.exists()


def test_install_sh_keeps_a_folder_it_did_not_make(tmp_path):
    """A venv that cannot be made (here: python3 is not a Python) leaves an existing folder as it was."""
    bin_dir = _bin_dir(tmp_path, python3=False)
    os.symlink(shutil.which("false"), bin_dir / "python3")
    venv = tmp_path / "mine"
    venv.mkdir()
    (venv / "keep.txt").write_text("precious")
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, bin_dir, LLMPRUNE_VENV=str(venv)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "apt-get install python3-venv" in proc.stderr
    assert (venv / "keep.txt").read_text() == "precious"
