"""The flags every script shares: one name per concept (old names as hidden, deprecated aliases),
defaults said once in --help, and transform.py's default input."""

from __future__ import annotations

import doctest
import importlib
import logging
import re
import sys
from pathlib import Path

import pytest

import utils.cli
import utils.contract
from utils.cli import RENAMED_FLAGS, renamed_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

SCRIPTS = ["transform", "inverse", "generate", "embed", "predict", "retrieve_example_data", "prediction",
           "generation", "embedding", "reconstruction"]


@pytest.mark.parametrize("module", [utils.cli, utils.contract])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_old_names_become_the_one_name_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cell2sentence"):
        argv = renamed_flags(["--cell_type_column", "tissue", "--max_genes=5", "--labels_key", "x", "--seed", "3",
                              "--data_filepath", "f.h5ad"], {"--data_filepath": "--preprocessed_h5ad"})
    assert argv == ["--label_column", "tissue", "--top_k_genes=5", "--label_column", "x", "--seed", "3",
                    "--preprocessed_h5ad", "f.h5ad"]
    assert [r.getMessage() for r in caplog.records] == [
        "--cell_type_column is now called --label_column; the old name will go.",
        "--max_genes is now called --top_k_genes; the old name will go.",
        "--labels_key is now called --label_column; the old name will go.",
        "--data_filepath is now called --preprocessed_h5ad; the old name will go.",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_each_concept_once_and_each_default_once(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = set(re.findall(r"--\w+", text))
    assert not flags & set(RENAMED_FLAGS)
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat
    for paragraph in flat.split(" --"):
        assert paragraph.count("(default:") <= 1, paragraph


def test_old_flag_names_still_parse(tmp_path):
    import eval.reconstruction as reconstruction
    import generate
    import inverse
    import transform

    assert transform.parse_args(["--data_filepath", "x.h5ad", "--max_genes", "7"]).top_k_genes == 7
    args = inverse.parse_args(["--sentences", "s.txt", "--labels_key", "requested_cell_type", "--max_genes", "3"])
    assert (args.label_column, args.top_k_genes) == ("requested_cell_type", 3)
    model = tmp_path / "m"
    model.mkdir()
    assert generate.parse_args(["--model_dir", str(model), "--cell_type_column", "tissue"]).label_column == "tissue"
    assert reconstruction.parse_args(["--data_filepath", "p.h5ad"]).preprocessed_h5ad == Path("p.h5ad")


def test_transform_without_flags_reads_the_example_that_retrieve_wrote(tmp_path, monkeypatch):
    import transform

    monkeypatch.chdir(tmp_path)
    assert transform.parse_args([]).data_filepath == Path("data/dominguez_sample.h5ad")  # nothing retrieved yet
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".example_path").write_text(f"{tmp_path}/data/pbmc68k_reduced.h5ad\n")
    assert transform.parse_args([]).data_filepath == tmp_path / "data" / "pbmc68k_reduced.h5ad"


@pytest.mark.parametrize("script", sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *(ROOT / "eval").glob("*.py")]))
def test_a_script_defines_everything_before_it_runs(script):
    """``python script.py`` runs the ``__main__`` block where it stands: a function defined after it
    is missing then (tests calling main() would not notice)."""
    import ast

    body = ast.parse((ROOT / script).read_text()).body
    guards = [i for i, node in enumerate(body) if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert not guards or guards[-1] == len(body) - 1, f"{script}: code after its __main__ block"


def test_a_script_run_keeps_anndatas_categorical_notes_quiet(tmp_path: Path) -> None:
    """Writing string obs columns makes anndata print "... storing 'x' as categorical" per column."""
    import subprocess

    code = f"""
import anndata as ad, numpy as np, pandas as pd
from utils.cli import run_cli
def main(args):
    obs = pd.DataFrame({{"cell_type": ["B", "T", "B"]}}, index=["a", "b", "c"])
    ad.AnnData(np.ones((3, 2), dtype=np.float32), obs=obs).write_h5ad({str(tmp_path / "x.h5ad")!r})
    ad.logging.anndata_logger.warning("a warning still shows")
run_cli(main, lambda argv: None)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "as categorical" not in done.stderr and "a warning still shows" in done.stderr, done.stderr
    assert (tmp_path / "x.h5ad").exists()
