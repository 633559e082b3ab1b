"""The test suite leaves nothing behind: every cache the libraries write is under pytest's temporary root (removed
when the session passes), and a session that writes into the user's caches fails."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import CACHE_VARS, USER_CACHES, snapshot, stray_files

HERE = Path(__file__).resolve().parent


def test_the_libraries_write_their_caches_under_the_session_root(tmp_path_factory):
    import datasets.config
    import huggingface_hub.constants

    base = tmp_path_factory.getbasetemp() / "caches"
    for var in CACHE_VARS:
        assert Path(os.environ[var]).is_relative_to(base), var
    # read when the libraries were imported: so the variables were set before that
    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(base)
    assert Path(huggingface_hub.constants.HF_HUB_CACHE).is_relative_to(base)
    if importlib.util.find_spec("triton.knobs") is not None:  # triton >= 3.4; older ones read TRITON_CACHE_DIR on use
        from triton import knobs

        assert Path(knobs.cache.dir).is_relative_to(base)
    assert not any(root.is_relative_to(base) for root in USER_CACHES.values())
    assert Path(tempfile.gettempdir()).is_relative_to(base) and Path(os.environ["TMPDIR"]).is_relative_to(base)


def test_a_local_dataset_folder_is_cached_in_the_session_not_the_users(tmp_path):
    """datasets keeps an Arrow copy of each folder it loads (test_data's hfdir): here, in the session's cache."""
    import json

    import datasets.config

    from llmprune.data import load_documents

    folder = tmp_path / "hfdir"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    before_user = snapshot(USER_CACHES)
    session_cache = {"d": Path(datasets.config.HF_DATASETS_CACHE)}
    before = snapshot(session_cache)
    docs, _ = load_documents(f"hf:{folder}", "train")
    assert docs == tuple(f"row {i}" for i in range(5))
    assert stray_files(before, snapshot(session_cache))  # written, and here
    assert stray_files(before_user, snapshot(USER_CACHES)) == []


def test_stray_files_are_the_new_and_the_changed(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "old").write_text("a")
    (root / "same").write_text("b")
    before = snapshot({"c": root, "missing": tmp_path / "none"})
    (root / "old").write_text("a longer")
    (root / "sub").mkdir()
    (root / "sub" / "new").write_text("c")
    assert stray_files(before, snapshot({"c": root})) == [str(root / "old"), str(root / "sub" / "new")]


def test_a_session_that_writes_into_the_users_cache_fails(tmp_path):
    """This conftest in a session of its own, whose one test writes into (a stand-in) ~/.triton."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(HERE / "conftest.py", project / "conftest.py")
    (project / "test_writes.py").write_text(
        "from pathlib import Path\n\n"
        "def test_writes_into_the_home_cache():\n"
        "    d = Path.home() / '.triton' / 'cache'\n"
        "    d.mkdir(parents=True)\n"
        "    (d / 'kernel.bin').write_text('x')\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    env["HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           str(project)], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert "the test suite wrote 1 file(s) into the user's caches" in proc.stdout
    assert str(home / ".triton" / "cache" / "kernel.bin") in proc.stdout
