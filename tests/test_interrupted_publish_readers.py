"""Readers of a folder whose publish was cut short (issue 18, section 4): every script that reads
a model or a transform output finishes a committed publish there first (``settle_inputs``), so
it reads the new outputs, never the old ones beside them nor a folder with neither.

The publish is the real one (``utils.publish.publish_staged``), killed with SIGKILL at a chosen
file-system change, as in tests/test_reliability_run.py:
- step 1, before the commit rename: nothing committed, the old outputs stay (the staging
  folder of the dead run is ignored);
- step 2, right after the commit point: the new outputs wait in ``.publish-*``, the old ones
  are still in place (embed.py and the eval scripts read the old ones);
- later steps: some old outputs moved aside, their new ones not yet in (a model without its
  config.json, a transform without cell_sentences_hf).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_counts, write_h5ad
from helpers_models import word_level_model
from helpers_train import make_dataset_dir

from utils.cli import InputError
from utils.publish import PUBLISH_PREFIX, publish_staged, settle_inputs

ROOT = Path(__file__).resolve().parents[1]


class AtChange:
    """Call ``action`` before the k-th file-system change (rename, replace, unlink, rmdir)."""

    def __init__(self, k: int, action) -> None:
        self.k, self.action, self.n = k, action, 0
        self.originals = {name: getattr(os, name) for name in ("rename", "replace", "unlink", "rmdir")}

    def _wrap(self, name):
        def changed(*args, **kwargs):
            self.n += 1
            if self.n == self.k:
                self.action()
            return self.originals[name](*args, **kwargs)
        return changed

    def __enter__(self) -> AtChange:
        for name in self.originals:
            setattr(os, name, self._wrap(name))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.originals.items():
            setattr(os, name, fn)


def publish_killed_at(step: int, new: dict[str, Path], folder: Path, names: list[str]) -> bool:
    """Stage copies of ``new`` (name -> file or folder) in ``folder`` and publish them there in
    a child process killed by SIGKILL before the ``step``-th change; True when it was killed."""
    staging = folder / ".staging-final"
    for name, source in new.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, staging / name)
        else:
            shutil.copy2(source, staging / name)
    pid = os.fork()
    if pid == 0:
        try:
            with AtChange(step, lambda: os.kill(os.getpid(), signal.SIGKILL)):
                publish_staged(staging, folder, names)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def visible(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


# ------------------------------------------------------------------------------ the protocol


@pytest.mark.parametrize("step", range(1, 12))
def test_a_reader_sees_the_new_outputs_once_the_publish_was_committed(tmp_path: Path, step: int) -> None:
    folder = tmp_path / "out"
    old = {"a.txt": "old a", "d/x.txt": "old x", "keep.txt": "not an output"}
    for name, text in old.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    new_files = tmp_path / "new"
    (new_files / "d").mkdir(parents=True)
    (new_files / "a.txt").write_text("new a")
    (new_files / "d" / "x.txt").write_text("new x")
    killed = publish_killed_at(step, {"a.txt": new_files / "a.txt", "d": new_files / "d"}, folder, ["a.txt", "d"])
    settle_inputs(folder / "d")  # a reader of one output: the publish into its parent is finished
    new = {"a.txt": "new a", "d/x.txt": "new x", "keep.txt": "not an output"}
    assert visible(folder) == (old if step == 1 else new), f"killed ({killed}) before change {step}"
    assert not list(folder.glob(PUBLISH_PREFIX + "*"))


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from utils.publish import claim_output_dir, release_output_dir
    folder = Path(sys.argv[1])
    claim_output_dir(folder)
    (folder / ".publish-live").mkdir()
    print("ready", flush=True)
    time.sleep(float(sys.argv[2]))
    (folder / ".publish-live").rmdir()  # its publish done
    time.sleep(60)
""")


@pytest.mark.parametrize("finishes", [True, False], ids=["finishes", "does_not_finish"])
def test_a_publish_of_a_live_run_is_waited_for_then_refused(tmp_path: Path, finishes: bool) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "0.3" if finishes else "60"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        if finishes:
            settle_inputs(folder, wait_s=20)
            assert not (folder / ".publish-live").exists()
        else:
            with pytest.raises(InputError, match=rf"being published by another run \(process {proc.pid}\)"):
                settle_inputs(folder, wait_s=0.5)
            assert (folder / ".publish-live").is_dir()  # the live run's, left alone
    finally:
        proc.kill()
        proc.wait()


def test_a_cut_short_publish_that_cannot_be_finished_is_one_sentence(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "out"
    (folder / ".publish-dead").mkdir(parents=True)
    # Not writable for this user (a chmod does not stop root, who runs the tests in CI).
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(InputError, match="publish was cut short .*not writable"):
        settle_inputs(folder)
    monkeypatch.undo()
    settle_inputs(tmp_path / "elsewhere" / "missing")  # nothing pending, nothing there: nothing to do


# ------------------------------------------------------------------------------ a model


def train_py_names(staged: Path) -> list[str]:
    """The order of train.py's publish: config.json (or the adapter's) last in, first aside."""
    return ["config.json", "adapter_config.json", *sorted(p.name for p in staged.iterdir())]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two word-level models of the same vocabulary with different weights (old, new)."""
    import torch
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("models")
    old, new = word_level_model(root / "old"), word_level_model(root / "new")
    model = GPT2LMHeadModel.from_pretrained(str(new))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(str(new))
    return old, new


@pytest.mark.parametrize("step", [2, 3], ids=["at_the_commit_point", "config_json_moved_aside"])
def test_embed_reads_the_committed_model(one_thread, tmp_path: Path, models, step: int) -> None:
    import anndata as ad

    import embed
    from utils.models.cell_model import CellSentenceModel

    old, new = models
    run = tmp_path / "runs" / "r"
    shutil.copytree(old, run)
    assert publish_killed_at(step, {p.name: p for p in new.iterdir()}, run, train_py_names(new))
    if step == 2:
        assert (run / ".publish-final").is_dir() and (run / "config.json").is_file()
    else:
        assert not (run / "config.json").exists()  # what made CellSentenceModel.load refuse it
    # 3 cells: no UMAP (seconds of compiling on its first use), which is not what is tested here
    data = make_dataset_dir(tmp_path / "t" / "cell_sentences_hf", n_train=1, n_valid=1, n_test=1)
    out = tmp_path / "emb"
    embed.main(embed.parse_args(["--model_dir", str(run), "--data_dir", str(data), "--output_dir", str(out)]))
    X = ad.read_h5ad(out / "embeddings.h5ad").obsm["X_c2s"]
    from datasets import load_from_disk

    dd = load_from_disk(str(data))
    sentences = [s for split in ("train", "valid", "test") for s in dd[split]["cell_sentence"]]
    np.testing.assert_allclose(X, CellSentenceModel.load(new, device="cpu").embed_cells(sentences), atol=1e-5)
    assert not np.allclose(X, CellSentenceModel.load(old, device="cpu").embed_cells(sentences), atol=1e-3)
    assert not list(run.glob(".publish-*")) and not list(run.glob(".staging-*"))


# ------------------------------------------------------------------------------ a transform


@pytest.fixture(scope="module")
def transforms(tmp_path_factory) -> tuple[Path, Path]:
    """Two transform outputs of inputs with the same file name (old: 70 cells, new: 110, their
    names starting with old_ and new_)."""
    import transform

    out = []
    for name, n, seed in (("old", 70, 1), ("new", 110, 2)):
        adata = synthetic_counts(n, 120, seed=seed)
        adata.obs_names = [f"{name}_{c}" for c in adata.obs_names]
        h5ad = write_h5ad(adata, tmp_path_factory.mktemp(f"in_{name}") / "x.h5ad")
        folder = tmp_path_factory.mktemp(name)
        transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(folder),
                                             "--min_genes_per_cell", "5", "--eval_cells", "20"]))
        out.append(folder)
    return out[0], out[1]


def killed_transform(tmp_path: Path, transforms, step: int) -> Path:
    """The old transform output with the new one's publish killed before change ``step``."""
    from utils.contract import transform_names

    old, new = transforms
    folder = tmp_path / "data"
    shutil.copytree(old, folder)
    names = transform_names("x")
    assert publish_killed_at(step, {n: new / n for n in names if (new / n).exists()}, folder, names)
    return folder


def without_paths(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("data_filepath", "predictions")}


def test_eval_scripts_read_the_committed_transform(tmp_path: Path, transforms) -> None:
    """Killed at the commit point: the old transform still in place, the new one committed."""
    from eval import prediction, reconstruction

    old, new = transforms
    folder = killed_transform(tmp_path, transforms, 2)
    assert list(folder.glob(PUBLISH_PREFIX + "*")) and (folder / "cell_sentences_hf").is_dir()
    # Predictions of the new transform's cells, scored with its expression baseline.
    import anndata as ad

    obs = ad.read_h5ad(new / "x_preprocessed.h5ad", backed="r").obs
    test = obs[obs["split"] == "test"]
    table = pd.DataFrame({"cell_name": test.index, "true": test["cell_type"].astype(str),
                          "predicted": test["cell_type"].astype(str)})
    table.to_csv(tmp_path / "predictions.csv", index=False)
    got = {}
    for where, transform_dir in (("killed", folder), ("new", new)):
        got[where] = (
            reconstruction.main(reconstruction.parse_args(["--transform_dir", str(transform_dir), "--output_dir",
                                                           str(tmp_path / f"rec_{where}")])),
            prediction.main(prediction.parse_args(["--predictions", str(tmp_path / "predictions.csv"),
                                                   "--transform_dir", str(transform_dir), "--output_dir",
                                                   str(tmp_path / f"pred_{where}"), "--n_components", "5"])),
        )
    assert [without_paths(m) for m in got["killed"]] == [without_paths(m) for m in got["new"]]
    n_new = ad.read_h5ad(new / "x_preprocessed.h5ad", backed="r").n_obs
    assert got["killed"][0]["n_cells"] == n_new != ad.read_h5ad(old / "x_preprocessed.h5ad", backed="r").n_obs
    assert got["killed"][1]["baselines"]["pca_knn"]["n_cells"] == len(test)
    assert json.loads((folder / "transform_args.json").read_text()) == json.loads(
        (new / "transform_args.json").read_text())


def test_embed_reads_a_transform_killed_with_its_dataset_moved_aside(one_thread, tmp_path: Path,
                                                                     transforms) -> None:
    import anndata as ad
    from datasets import load_from_disk
    from helpers_models import make_published_model

    import embed

    folder = killed_transform(tmp_path, transforms, 4)  # cell_sentences, then cell_sentences_hf, aside
    assert not (folder / "cell_sentences_hf").exists()
    out = tmp_path / "emb"
    model = make_published_model(tmp_path / "pub")  # byte-level: it spells the synthetic genes
    metrics = embed.main(embed.parse_args(["--model_dir", str(model), "--data_dir", str(folder / "cell_sentences_hf"),
                                           "--output_dir", str(out), "--max_cells", "3"]))  # 3: no UMAP
    dd = load_from_disk(str(transforms[1] / "cell_sentences_hf"))
    names = {n for split in ("train", "valid", "test") for n in dd[split]["cell_name"]}
    embedded = ad.read_h5ad(out / "embeddings.h5ad").obs_names.tolist()
    assert metrics["n_cells"] == 3 and set(embedded) <= names and all(n.startswith("new_") for n in embedded)
