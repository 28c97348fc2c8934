"""The numba cache follows the code: editing any module of utils/ gives a fresh cache folder, so a
kernel never runs an old copy of a function it inlines from another module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import utils


def _cache_dir_of(package_parent: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    code = "import utils, numba; print(numba.config.CACHE_DIR)"
    done = subprocess.run([sys.executable, "-c", code], cwd=package_parent, env=env,
                          capture_output=True, text=True, check=True, timeout=120)
    return done.stdout.strip()


def test_editing_a_module_changes_the_kernel_cache(tmp_path):
    shutil.copytree(Path(utils.__file__).parent, tmp_path / "utils", ignore=shutil.ignore_patterns("__pycache__"))
    before = _cache_dir_of(tmp_path)
    assert before.startswith(str(tmp_path / "utils" / "__pycache__" / "numba-"))
    assert _cache_dir_of(tmp_path) == before  # stable while nothing changes
    with (tmp_path / "utils" / "ranking.py").open("a") as f:
        f.write("\n# an edit\n")
    assert _cache_dir_of(tmp_path) != before
