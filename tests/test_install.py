"""`pip install -e .` installs the project so that its code imports from any folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def importable_from(folder: Path) -> bool:
    """Whether this environment imports the API outside the repository (``make setup``'s install)."""
    code = "from utils import adata_to_sentences"
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=folder, capture_output=True).returncode == 0


def test_editable_install_makes_utils_and_the_scripts_importable_from_anywhere(tmp_path):
    prefix = tmp_path / "prefix"
    installed_before = importable_from(tmp_path)
    # --no-build-isolation and --no-deps: offline and quick; the build itself is the real one
    # (setuptools reading pyproject.toml, which refused the flat layout before). --ignore-installed:
    # into the prefix only, leaving this environment's own install of the project in place.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--ignore-installed", "--prefix", str(prefix), "-e", str(ROOT)], check=True, cwd=tmp_path)
    assert importable_from(tmp_path) == installed_before  # the environment is as the test found it
    site_packages = next(prefix.glob("lib/python*/site-packages"))
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); "
        "import importlib.metadata as m, utils, transform; from utils import adata_to_sentences; "
        "print(utils.__file__, transform.__file__, m.version('cell2sentence-scripts'), adata_to_sentences.__module__)"
    )
    # -I: isolated mode, so neither the current folder nor PYTHONPATH can be what finds the code.
    out = subprocess.run([sys.executable, "-I", "-c", code, str(site_packages)], cwd=elsewhere,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(ROOT / "utils" / "__init__.py"), str(ROOT / "transform.py"), "0.1.0", "utils.transform.sentences"]
