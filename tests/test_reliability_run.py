"""Reliability battery, run-level classes (issue 11, sections 3-6): publishing outputs under
kill -9, Ctrl-C and SIGTERM at every step, concurrent runs, errors around the run (output path,
read-only or full disk, Ctrl-C while starting), damaged models and checkpoints, and the label
and split items of train.py / generate.py.

Every case here failed on the code before this battery (c397bf5) and passes now; those of
section 7 (issue 18) failed on ce56869. Faults are
real where the machine allows: a SIGKILL, SIGINT or SIGTERM delivered to a process, a
read-only or full tmpfs mounted for the test (as root; skipped where mounting is impossible),
truncated files. Only the *moment* of a kill is chosen by a hook that counts file-system
changes.

    python -m pytest -q tests/test_reliability_run.py
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import synthetic_counts, write_h5ad
from helpers_train import make_dataset_dir

import generate
import inverse
import train
import transform
from utils.cli import InputError
from utils.publish import staged_outputs

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = [
    "--init_from_scratch", "True", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
    "--n_positions", "128", "--top_k_genes", "10", "--per_device_train_batch_size", "8",
    "--learning_rate", "5e-3", "--disable_tqdm", "True", "--seed", "3", "--report_to", "none",
]


# ------------------------------------------------------------------------------ helpers


def strict_json(path: Path):
    """Parse as strict JSON: NaN or Infinity is an error (as in jq or JavaScript)."""
    def refuse(constant: str):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def visible(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its text, to compare whole states."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = p.read_text()
    return out


OLD = {"a.txt": "old a", "d/x.txt": "old x", "d/y.txt": "old y", "keep.txt": "not an output"}
NEW = {"a.txt": "new a", "d/x.txt": "new x", "n.txt": "new n", "keep.txt": "not an output"}
NAMES = ["a.txt", "d", "n.txt"]


def old_outputs(folder: Path) -> None:
    for name, text in OLD.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def write_new(tmp: Path) -> None:
    for name, text in NEW.items():
        if name != "keep.txt":
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


class AtChange:
    """Call ``action`` at the k-th file-system change (rename, replace, unlink, rmdir) after
    ``arm()``: the moment of a kill or a signal, chosen among the steps of a publish."""

    def __init__(self, k: int, action) -> None:
        self.k, self.action, self.n, self.armed = k, action, 0, False
        self.originals = {name: getattr(os, name) for name in ("rename", "replace", "unlink", "rmdir")}

    def arm(self) -> None:
        self.armed = True

    def _wrap(self, name):
        def changed(*args, **kwargs):
            if self.armed:
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


def next_start(folder: Path) -> None:
    """What any script does first on its output folder (here: a run that writes nothing)."""
    with staged_outputs(folder, [], overwrite=True):
        pass


def run_script(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          **kwargs)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def transformed(tmp_path_factory) -> Path:
    """A small transform output (vocabulary, fit, sentences) for inverse.py."""
    h5ad = write_h5ad(synthetic_counts(80, 120, seed=1), tmp_path_factory.mktemp("in") / "small.h5ad")
    out = tmp_path_factory.mktemp("transformed")
    transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(out),
                                         "--min_genes_per_cell", "5", "--eval_cells", "20"]))
    return out


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> Path:
    return write_h5ad(synthetic_counts(60, 100, seed=2), tmp_path_factory.mktemp("in2") / "x.h5ad")


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("cells") / "cell_sentences_hf", n_train=48,
                            n_valid=8, n_test=8, n_genes=20)


@pytest.fixture(scope="module")
def checkpointed(one_thread, cells, tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 2 and 4 (the run folder)."""
    out = tmp_path_factory.mktemp("runs")
    return train.main(train.parse_args([
        "--data_dir", str(cells), "--output_dir", str(out), "--run_name", "ck", "--max_steps", "4",
        "--save_steps", "2", "--save_strategy", "steps", *TINY]))


@pytest.fixture(scope="module")
def unconditional(one_thread, tmp_path_factory) -> tuple[Path, Path]:
    """A model trained on cells without labels, and its data."""
    data = make_dataset_dir(tmp_path_factory.mktemp("nolabels") / "cell_sentences_hf", n_train=48,
                            n_valid=8, n_test=8, n_genes=20, with_cell_type=False)
    out = tmp_path_factory.mktemp("runs_u")
    model = train.main(train.parse_args(["--data_dir", str(data), "--output_dir", str(out),
                                         "--run_name", "u", "--max_steps", "6", *TINY]))
    return model, data


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / run.name
    shutil.copytree(run, dst)
    return dst


# ---------------------------------------------------------- 3. publishing outputs


@pytest.mark.parametrize("step", range(1, 16))  # a publish makes 15 changes
def test_kill_9_at_any_step_of_the_publish_leaves_old_or_new_outputs(tmp_path, step):
    folder = tmp_path / "out"
    old_outputs(folder)
    pid = os.fork()
    if pid == 0:  # the run, killed with SIGKILL at the chosen change of its publish
        try:
            with AtChange(step, lambda: os.kill(os.getpid(), signal.SIGKILL)) as hook, \
                    staged_outputs(folder, NAMES, overwrite=True) as tmp:
                write_new(tmp)
                hook.arm()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    next_start(folder)
    state = visible(folder)
    assert state in (OLD, NEW), f"killed at change {step} (status {status}): {state}"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("step", range(1, 16))
def test_a_signal_at_any_step_of_the_publish_leaves_old_or_new_outputs(tmp_path, sig, step):
    folder = tmp_path / "out"
    old_outputs(folder)

    def like_ctrl_c(signum, frame):  # what run_cli makes of SIGTERM
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, like_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt), AtChange(step, lambda: os.kill(os.getpid(), sig)) as hook, \
                staged_outputs(folder, NAMES, overwrite=True) as tmp:
            write_new(tmp)
            hook.arm()
    finally:
        signal.signal(signal.SIGTERM, previous)
    state = visible(folder)
    assert state in (OLD, NEW), f"signal at change {step}: {state}"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_overwrite_is_checked_again_at_publish_time(tmp_path):
    folder = tmp_path / "out"
    with pytest.raises(InputError, match="--overwrite"), \
            staged_outputs(folder, ["a.txt"], overwrite=False) as tmp:
        (tmp / "a.txt").write_text("ours")
        (folder / "a.txt").write_text("another program's")  # appeared while we worked
    assert visible(folder) == {"a.txt": "another program's"}


def test_staging_folders_of_dead_runs_are_removed_and_logged(tmp_path, caplog):
    folder = tmp_path / "out"
    (folder / ".staging-dead1" / "cell_sentences").mkdir(parents=True)
    (folder / ".staging-dead1" / "cell_sentences" / "train.txt").write_text("half")
    with staged_outputs(folder, ["a.txt"], overwrite=False) as tmp:
        (tmp / "a.txt").write_text("new")
    assert visible(folder) == {"a.txt": "new"}
    assert "staging-dead1" in caplog.text and "did not finish" in caplog.text


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from utils.publish import staged_outputs
    folder = Path(sys.argv[1])
    with staged_outputs(folder, ["a.txt"], overwrite=True) as tmp:
        (tmp / "a.txt").write_text("live run")
        print("ready", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def live_run(tmp_path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Another process in the middle of writing its outputs into ``tmp_path/out``."""
    folder = tmp_path / "out"
    proc = subprocess.Popen([PYTHON, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc, folder
    proc.kill()
    proc.wait()


def test_a_second_run_into_a_held_folder_stops_at_once_and_spares_the_live_staging(live_run):
    proc, folder = live_run
    staging = [p for p in folder.iterdir() if p.name.startswith(".staging-")]
    started = time.perf_counter()
    with pytest.raises(InputError, match="in use by another run") as err, \
            staged_outputs(folder, ["a.txt"], overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second run")
    assert time.perf_counter() - started < 5 and str(proc.pid) in str(err.value)
    assert staging and all(p.is_dir() for p in staging), "the live run's staging folder was removed"
    assert not (folder / "a.txt").exists()


def test_the_lock_dies_with_its_process(live_run, caplog):
    proc, folder = live_run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with staged_outputs(folder, ["a.txt"], overwrite=True) as tmp:
        (tmp / "a.txt").write_text("after the kill")
    assert visible(folder) == {"a.txt": "after the kill"}
    assert "did not finish" in caplog.text  # its staging folder, removed and logged


PAUSED_INVERSE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import inverse
    from utils import cli
    marker, sys.argv = Path(sys.argv[1]), ["inverse.py", *sys.argv[2:]]
    save_args = cli.save_args
    def slow_save_args(*args):  # inside the staging block: outputs half written
        marker.write_text("ready")
        deadline = time.time() + 60
        while not marker.with_suffix(".go").exists() and time.time() < deadline:
            time.sleep(0.05)  # until the test lets it go on
        save_args(*args)
    cli.save_args = slow_save_args
    cli.run_cli(inverse.main, inverse.parse_args)
""")


def start_inverse(tmp_path: Path, transformed: Path, output: Path) -> tuple[subprocess.Popen, Path]:
    """inverse.py paused inside its staging block until the file it returns is created."""
    marker = tmp_path / f"{output.stem}.marker"
    proc = subprocess.Popen(
        [PYTHON, "-c", PAUSED_INVERSE, str(marker), "--sentences", str(transformed / "cell_sentences" / "test.txt"),
         "--transform_dir", str(transformed), "--output", str(output)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1]
    return proc, marker.with_suffix(".go")


def test_two_script_runs_into_one_folder_the_second_stops_with_a_sentence(tmp_path, transformed):
    output = tmp_path / "inv" / "test.h5ad"
    first, go = start_inverse(tmp_path, transformed, output)
    second = run_script("inverse.py", "--sentences", str(transformed / "cell_sentences" / "valid.txt"),
                        "--transform_dir", str(transformed), "--output", str(output))
    assert first.poll() is None  # still in the middle of its run
    go.write_text("")
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "in use by another run" in second.stderr
    import anndata as ad
    assert ad.read_h5ad(output).n_obs == len((transformed / "cell_sentences" / "test.txt").read_text().splitlines())


@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["sigterm"])
def test_sigterm_to_a_running_script_is_handled_like_ctrl_c(tmp_path, transformed, sig):
    output = tmp_path / "inv" / "test.h5ad"
    proc, _ = start_inverse(tmp_path, transformed, output)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "no partial output" in err and "Traceback" not in err
    assert not output.parent.exists() or not list(output.parent.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_the_libraries_load_is_one_line(sig):
    proc = subprocess.Popen([PYTHON, "train.py", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # python is up; transformers (4 s) is still loading
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err
    assert err.strip() == "Stopped while starting; nothing was written."


# ---------------------------------------------------------- 4. errors around the run


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (tests run as root); skip where mounting is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def transform_into(h5ad: Path, out: Path) -> None:
    transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(out),
                                         "--min_genes_per_cell", "5"]))


def inverse_into(transformed: Path, output: Path) -> None:
    inverse.main(inverse.parse_args(["--sentences", str(transformed / "cell_sentences" / "test.txt"),
                                     "--transform_dir", str(transformed), "--output", str(output)]))


def no_work(monkeypatch) -> None:
    """Reading the input counts as work: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the input was read before the output folder was checked")
    monkeypatch.setattr(transform, "open_inputs", refuse)
    monkeypatch.setattr(inverse, "load_sentences", refuse)
    monkeypatch.setattr(train, "build_model_and_tokenizer", refuse)


@pytest.mark.parametrize("where", ["output_dir_is_a_file", "parent_is_a_file"])
@pytest.mark.parametrize("script", ["transform", "inverse", "train"])
def test_an_output_path_through_a_file_is_one_sentence_before_any_work(
        tmp_path, monkeypatch, h5ad, transformed, cells, script, where):
    blocker = tmp_path / "taken"
    blocker.write_text("a file of the user's")
    out = blocker if where == "output_dir_is_a_file" else blocker / "sub"
    no_work(monkeypatch)
    with pytest.raises(InputError, match="is a file, not a folder"):
        if script == "transform":
            transform_into(h5ad, out)
        elif script == "inverse":
            inverse_into(transformed, out / "x.h5ad")
        elif where == "output_dir_is_a_file":  # the run folder <output_dir>/<run_name> is a file
            train.main(train.parse_args(["--data_dir", str(cells), "--output_dir", str(tmp_path),
                                         "--run_name", "taken", *TINY]))
        else:
            train.main(train.parse_args(["--data_dir", str(cells), "--output_dir", str(out), "--run_name", "r",
                                         *TINY]))
    assert blocker.read_text() == "a file of the user's"


@pytest.mark.parametrize("existing", [False, True], ids=["new_folder", "existing_folder"])
@pytest.mark.parametrize("script", ["transform", "inverse"])
def test_a_read_only_file_system_is_one_sentence_before_any_work(tmp_path, monkeypatch, h5ad, transformed,
                                                                 script, existing):
    with tmpfs(tmp_path / "ro", "size=1m") as mount:
        if existing:
            (mount / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        no_work(monkeypatch)
        with pytest.raises(InputError, match="read-only file system"):
            if script == "transform":
                transform_into(h5ad, mount / "out")
            else:
                inverse_into(transformed, mount / "out" / "x.h5ad")


def test_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, h5ad):
    with tmpfs(tmp_path / "small", "size=64k") as mount:
        with pytest.raises(InputError, match=r"is full \(.* free\)"):
            transform_into(h5ad, mount / "out")
        assert not list(mount.rglob("*")), "something was left on the full disk"


def test_a_full_disk_under_hdf5_is_one_sentence_and_exit_2(tmp_path, transformed):
    """inverse.py writes its h5ad through h5py: HDF5 keeps a file it could not flush open and
    used to crash the interpreter's teardown on it (exit 139 after the sentence, tracebacks)."""
    with tmpfs(tmp_path / "small", "size=16k") as mount:
        done = subprocess.run([PYTHON, "inverse.py", "--sentences", str(transformed / "cell_sentences" / "test.txt"),
                               "--transform_dir", str(transformed), "--output", str(mount / "out" / "x.h5ad")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert re.search(r"is full \(.* free\)", done.stderr) and "Traceback" not in done.stderr, done.stderr
        assert not list(mount.rglob("*")), "something was left on the full disk"


# ---------------------------------------------------------- 5. models and checkpoints


def generate_with(model: Path, data: Path, out: Path, *extra: str) -> dict:
    return generate.main(generate.parse_args(["--model_dir", str(model), "--data_dir", str(data),
                                              "--output_dir", str(out), "--batch_size", "8", *extra]))


def fine_tune(model: Path, data: Path, out: Path) -> Path:
    return train.main(train.parse_args(["--model_name", str(model), "--data_dir", str(data),
                                        "--output_dir", str(out), "--run_name", "ft", "--max_steps", "1",
                                        "--disable_tqdm", "True", "--report_to", "none"]))


MISSING = {
    "tokenizer": (["tokenizer.json", "tokenizer_config.json"], "no tokenizer files"),
    "weights": (["model.safetensors"], "no model weights"),
}


@pytest.mark.parametrize("script", ["generate", "train"])
@pytest.mark.parametrize("missing", list(MISSING))
def test_a_model_folder_without_tokenizer_or_weights_is_refused(tmp_path, checkpointed, cells, script, missing):
    model = copy_run(checkpointed, tmp_path)
    shutil.rmtree(model / "checkpoints")
    files, message = MISSING[missing]
    for name in files:
        (model / name).unlink()
    with pytest.raises(InputError, match=message):
        if script == "generate":
            generate_with(model, cells, tmp_path / "gen")
        else:
            fine_tune(model, cells, tmp_path / "runs2")
    assert not (tmp_path / "gen").exists() and not (tmp_path / "runs2" / "ft" / "config.json").exists()


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # one byte in the middle of the stored tensors
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:
        path.unlink()


def test_a_truncated_weights_file_is_named(tmp_path, checkpointed, cells):
    model = copy_run(checkpointed, tmp_path)
    damage(model / "model.safetensors", "truncate")
    with pytest.raises(InputError, match=r"model\.safetensors is truncated or damaged"):
        generate_with(model, cells, tmp_path / "gen")


@pytest.mark.parametrize("name,how", [
    ("model.safetensors", "truncate"), ("optimizer.pt", "truncate"), ("optimizer.pt", "flip"),
    ("scheduler.pt", "truncate"), ("scheduler.pt", "delete"), ("rng_state.pth", "truncate"),
    ("trainer_state.json", "truncate"),
])
def test_a_damaged_checkpoint_file_is_named(tmp_path, checkpointed, cells, name, how):
    run = copy_run(checkpointed, tmp_path)
    checkpoint = run / "checkpoints" / "checkpoint-4"
    damage(checkpoint / name, how)
    with pytest.raises(InputError, match=f"{name} is (missing|truncated or damaged|damaged)"):
        train.main(train.parse_args(["--data_dir", str(cells), "--output_dir", str(run.parent),
                                     "--checkpoint", str(checkpoint), "--max_steps", "6", "--overwrite", "True",
                                     *TINY]))


def test_checkpoint_latest_skips_one_still_being_written(tmp_path, checkpointed, cells, caplog):
    run = copy_run(checkpointed, tmp_path)
    # What a run killed while saving checkpoint-4 leaves: the Trainer writes trainer_state.json last.
    (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    run_dir = train.main(train.parse_args([
        "--data_dir", str(cells), "--output_dir", str(run.parent), "--run_name", run.name,
        "--checkpoint", "latest", "--max_steps", "4", "--save_steps", "2", "--save_strategy", "steps",
        "--overwrite", "True", *TINY]))
    record = json.loads((run_dir / "train_args.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2")
    assert json.loads((run_dir / "train_results.json").read_text())["global_step"] == 4
    assert "Skipping checkpoint-4" in caplog.text


# ---------------------------------------------------------- 6. labels and splits (train, generate)


def test_train_with_a_misspelled_label_column_is_an_error(tmp_path, cells):
    with pytest.raises(InputError, match="no column 'celltype'.*cell_type"):
        train.main(train.parse_args(["--data_dir", str(cells), "--output_dir", str(tmp_path), "--run_name", "r",
                                     "--cell_type_column", "celltype", *TINY]))


def test_a_model_trained_without_labels_generates_from_the_command_line(tmp_path, monkeypatch, unconditional):
    import utils.models.examples
    from utils.models.prompts import generation_prompt

    model, data = unconditional
    out = tmp_path / "gen"
    prompts = []
    encode = utils.models.examples.encode_prompt
    monkeypatch.setattr(utils.models.examples, "encode_prompt", lambda tok, prompt, *a: prompts.append(prompt) or
                        encode(tok, prompt, *a))
    metrics = generate_with(model, data, out, "--max_new_tokens", "12")
    assert prompts == [generation_prompt(None, 10)] * 8  # the unconditional prompt, not "of type None"
    sentences = (out / "generated_cells.txt").read_text().splitlines()
    assert len(sentences) == 8 == metrics["generation"]["sentences"]["n_cells"]
    assert metrics["generation"]["requested_counts"] == {"any": 8}
    assert "knn" not in metrics["generation"] and "prediction" not in metrics
    assert not (out / "generated_labels.txt").exists()
    assert json.loads((out / "generate_args.json").read_text())["tasks"] == "generate"
    strict_json(out / "metrics.json")


def test_generation_for_chosen_cell_types(tmp_path, checkpointed, cells):
    out = tmp_path / "gen"
    metrics = generate_with(checkpointed, cells, out, "--tasks", "generate", "--cell_types", "B cell,NK cell",
                            "--n_per_type", "2", "--max_new_tokens", "12")
    assert (out / "generated_labels.txt").read_text().splitlines() == ["B cell"] * 2 + ["NK cell"] * 2
    assert metrics["generation"]["requested_counts"] == {"B cell": 2, "NK cell": 2}


@pytest.mark.parametrize("which", ["unknown_type", "types_for_an_unconditional_model"])
def test_a_cell_type_the_model_cannot_generate_is_an_error(tmp_path, checkpointed, unconditional, cells, which):
    if which == "unknown_type":
        with pytest.raises(InputError, match="never saw 'T cell'.*'B cell'.*'NK cell'"):
            generate_with(checkpointed, cells, tmp_path / "gen", "--cell_types", "B cell,T cell")
    else:
        with pytest.raises(InputError, match="trained without cell types"):
            generate_with(unconditional[0], unconditional[1], tmp_path / "gen", "--cell_types", "B cell")
    assert not (tmp_path / "gen").exists()


def test_an_empty_split_is_a_clear_message(tmp_path, checkpointed, h5ad):
    transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(tmp_path / "t"),
                                         "--min_genes_per_cell", "5", "--split_fractions", "0.9", "0.1", "0"]))
    with pytest.raises(InputError, match="test split .* is empty"):
        generate_with(checkpointed, tmp_path / "t" / "cell_sentences_hf", tmp_path / "gen")


@pytest.fixture(scope="module")
def silent_model(checkpointed, tmp_path_factory) -> Path:
    """The tiny model made to answer every prompt with EOS at once (an untrained model can):
    no generated gene, so the word statistics are undefined."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("silent") / "silent"
    shutil.copytree(checkpointed, out, ignore=shutil.ignore_patterns("checkpoints"))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    eos = model.config.eos_token_id
    with torch.no_grad():
        direction = torch.zeros(model.config.n_embd)
        direction[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[eos, 0] = 100.0
    model.save_pretrained(str(out))
    return out


def test_metrics_json_is_strict_json(tmp_path, silent_model, cells):
    out = tmp_path / "gen"
    generate_with(silent_model, cells, out, "--tasks", "generate", "--n_per_type", "1", "--no_constrain_genes")
    metrics = strict_json(out / "metrics.json")
    assert metrics["generation"]["sentences"]["n_words"] == 0
    assert metrics["generation"]["sentences"]["valid_gene_rate"] is None


# ---------------------------------------------------------- 7. train.py and model loading (issue 18)


@pytest.mark.parametrize("flags,message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, not 0."),
    (["--learning_rate", "nan"], "--learning_rate must be a positive number, not nan"),
    (["--learning_rate", "-0.001"], "--learning_rate must be a positive number, not -0.001"),
    (["--max_steps", "-3", "--num_train_epochs", "0"], "--max_steps -3 with --num_train_epochs 0.0 would train no "
                                                        "step; give a positive --max_steps or --num_train_epochs."),
], ids=["batch_size_0", "lr_nan", "lr_negative", "no_step"])
def test_train_flags_that_cannot_work_are_one_sentence_before_any_work(tmp_path, monkeypatch, cells, flags,
                                                                       message):
    no_work(monkeypatch)
    with pytest.raises(InputError) as err:
        train.main(train.parse_args(["--data_dir", str(cells), "--output_dir", str(tmp_path / "runs"),
                                     "--run_name", "r", *TINY, *flags]))
    assert str(err.value).startswith(message)
    assert not (tmp_path / "runs").exists()  # nothing written, nothing published as finished


class NotATensor:
    """Pickled by reference: torch's weights-only loader refuses it without running any code."""


def unsafe_torch_file(path: Path, content: dict | None = None) -> None:
    import torch

    torch.save({**(content or {}), "hook": NotATensor()}, path)


@pytest.mark.parametrize("name,how,message", [
    ("optimizer.pt", "random", "is no file saved by torch"),
    ("optimizer.pt", "unsafe", "is refused by torch's safe weights-only loader: it holds the Python object "
                               "test_reliability_run.NotATensor"),
    ("rng_state.pth", "unsafe", "is refused by torch's safe weights-only loader"),
])
def test_a_checkpoint_file_torch_would_refuse_is_named(tmp_path, checkpointed, cells, name, how, message):
    run = copy_run(checkpointed, tmp_path)
    checkpoint = run / "checkpoints" / "checkpoint-4"
    before = (checkpoint / name).read_bytes()
    if how == "random":
        (checkpoint / name).write_bytes(os.urandom(len(before)))
    else:
        unsafe_torch_file(checkpoint / name)
    with pytest.raises(InputError) as err:
        train.main(train.parse_args(["--output_dir", str(run.parent), "--run_name", run.name, "--checkpoint",
                                     str(checkpoint), "--max_steps", "6", *TINY]))
    assert str(err.value).startswith(f"Cannot resume from {checkpoint}: {checkpoint / name} {message}")
    assert (run / "config.json").is_file() and (checkpoint / "trainer_state.json").is_file()  # nothing lost


def as_pytorch_model_bin(model: Path, *, unsafe: bool) -> None:
    """Replace the folder's model.safetensors by the same weights in a pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    if unsafe:
        unsafe_torch_file(model / "pytorch_model.bin", weights)
    else:
        torch.save(weights, model / "pytorch_model.bin")


@pytest.mark.parametrize("unsafe", [False, True], ids=["plain", "unsafe"])
def test_a_pytorch_model_bin_torch_would_refuse_is_named(tmp_path, checkpointed, unsafe):
    from utils.models.loading import load_model_and_tokenizer

    model = copy_run(checkpointed, tmp_path)
    as_pytorch_model_bin(model, unsafe=unsafe)
    if not unsafe:  # the check refuses only what torch refuses
        assert load_model_and_tokenizer(model, "cpu")[0].num_parameters() > 0
        return
    with pytest.raises(InputError, match=re.escape(f"{model / 'pytorch_model.bin'} is refused by torch's safe "
                                                   "weights-only loader")):
        load_model_and_tokenizer(model, "cpu")


@pytest.mark.parametrize("how", ["api", "train"])
def test_weights_of_a_differently_sized_model_are_one_sentence(tmp_path, checkpointed, cells, how):
    from transformers import AutoModelForCausalLM, GPT2Config

    from utils.models.loading import load_model_and_tokenizer

    model = copy_run(checkpointed, tmp_path)
    shutil.rmtree(model / "checkpoints")
    config = json.loads((model / "config.json").read_text())
    other = GPT2Config(vocab_size=config["vocab_size"], n_positions=config["n_positions"], n_layer=1,
                       n_embd=2 * config["n_embd"], n_head=2)
    AutoModelForCausalLM.from_config(other).save_pretrained(str(tmp_path / "other"))
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    with pytest.raises(InputError) as err:
        if how == "api":
            load_model_and_tokenizer(model, "cpu")
        else:
            fine_tune(model, cells, tmp_path / "runs2")
    assert str(err.value) == (f"The weights in {model} do not fit the model its config.json describes (tensors of "
                              "other sizes: the weights of a differently sized model); copy the model folder again, "
                              "weights and config.json together.")


def test_a_tokenizer_of_another_run_is_one_sentence(tmp_path, checkpointed):
    from transformers import AutoTokenizer

    from utils.models.loading import load_model_and_tokenizer

    model = copy_run(checkpointed, tmp_path)
    rows = json.loads((model / "config.json").read_text())["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.add_tokens([f"OTHERGENE{i}" for i in range(rows + 100 - len(tokenizer))])
    tokenizer.save_pretrained(str(model))
    with pytest.raises(InputError) as err:
        load_model_and_tokenizer(model, "cpu")
    assert str(err.value) == (
        f"The tokenizer of {model} has {rows + 100:,} tokens, but its model has only {rows:,} (vocab_size): the "
        "tokenizer belongs to another model; copy the tokenizer files of the run that trained these weights.")


def test_a_full_disk_under_train_names_the_output_disk(tmp_path, cells):
    with tmpfs(tmp_path / "small", "size=64k") as mount:
        with pytest.raises(InputError) as err:
            train.main(train.parse_args(["--data_dir", str(cells), "--output_dir", str(mount / "runs"),
                                         "--run_name", "r", "--max_steps", "2", *TINY]))
        assert re.fullmatch(rf"The disk holding {re.escape(str(mount))}/runs/r\S* is full \(0\.\d MiB free\): free "
                            "some space or choose an output folder on another disk.", str(err.value)), str(err.value)
        assert not (mount / "runs" / "r" / ".staging-final").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU")
def test_train_under_torchrun_logs_once_and_asks_no_unused_parameter_search(tmp_path, cells):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), "--data_dir", str(cells), "--output_dir", str(tmp_path),
                           "--run_name", "r", "--max_steps", "2", *TINY], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Training on 48 cells") == 1, done.stderr[-3000:]
    assert "loss_type=None" not in done.stderr  # GPT-2's loss is named, so nobody warns of it
    assert done.stderr.count("[transformers]") <= 1, done.stderr[-3000:]  # replicas stay quiet
    record = json.loads((tmp_path / "r" / "train_args.json").read_text())
    assert record["training"]["ddp_find_unused_parameters"] is False
    assert "Device cpu:0, 2 process(es)." in done.stderr
