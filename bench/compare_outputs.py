"""Prove that a refactor changed no output: run one small pipeline with two checkouts, compare.

two checkouts (``--before``, ``--after``) -> ``<work>/before/``, ``<work>/after/`` (every file the
pipeline wrote), ``<work>/logs_<side>/`` (one log per step), and a table on stdout: each file,
identical / DIFFERENT / only in before / only in after / new output. Exit code 1 when a data file
differs or is missing on one side, or a step fails; ``--new GLOB ...`` names the outputs a change
adds on purpose (e.g. ``'model/*/README.md'``), reported as new outputs instead.

The pipeline (about 2 minutes per side on 2 cores): scanpy's bundled pbmc68k_reduced
(retrieve_example_data.py, offline), transform.py, a tiny from-scratch train.py run (1 layer,
32 dims, 30 steps), predict.py on the test split and on the example .h5ad, generate.py (2 cells
per type), embed.py, inverse.py on the test sentences and on the generated ones, and each
eval/*.py script. Every step is a subprocess of ``sys.executable`` with cwd and PYTHONPATH set
to its checkout, one thread everywhere, the CPU only, offline, a fixed PYTHONHASHSEED. Only flag
names that exist at the reference commit are used: later versions keep accepting them.

Each side runs in the same folder, ``<work>/run``, which is then renamed to ``<work>/<side>``: the
paths the outputs record (the .h5ad files' uns, the metrics, the records) are the same on both
sides, so they compare byte for byte. What still differs from run to run of the same code:

- timings: the ``seconds``/``cells_per_second`` of metrics.json files and the ``train_runtime``
  and ``*_per_second`` of train_results.json / train_log.json are measured. JSON files are
  compared with these keys (any ``*seconds``, ``*runtime``, ``*_per_second``, ``*time``,
  ``*timestamp`` key) dropped; everything else in them must be equal.
- records (``*_args.json``, ``run_args.json``, ``recipe.json``, ``trainer_state.json``,
  ``training_args.bin``, ``.example_path``) may name paths (the checkouts are replaced by a
  placeholder) and times; they are listed apart and their differences shown as text diffs,
  values other than paths and timings flagged, but they never fail the run.

Everything else (sentences, barcodes, indices, arrow datasets, .h5ad files, safetensors,
optimizer and RNG state, CSVs, PNGs) was byte-identical between two runs of the reference, also
without the environment's pins (2 threads, random hash seed) on 2 cores: the pins guard against
machines with more cores, where thread counts change floating-point reductions. A binary data
file that differs is also loaded (.h5ad, .arrow, .npy, .png, .safetensors) to say which part of
it differs, or that it is the same once loaded (e.g. PNG metadata); it still fails the run.

Example::

    python bench/compare_outputs.py --before /tmp/c2s_start --after . --work /tmp/cmp
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RECORDS = ("*_args.json", "run_args.json", "recipe.json", "trainer_state.json",
           "training_args.bin", ".example_path", "*.log")
TIMING_KEY = re.compile(r"(seconds|runtime|_per_second|time|timestamp|elapsed)$")
RUN_ROOT = "<RUN>"


def pipeline(run: Path) -> list[tuple[str, list[str]]]:
    """The steps: (name, script and arguments), every path under ``run``."""
    data, model = run / "data", run / "model" / "tiny"
    hf, h5ad = data / "cell_sentences_hf", data / "pbmc68k_reduced.h5ad"
    gen = run / "generated"
    tiny = ["--init_from_scratch", "True", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
            "--n_positions", "128", "--top_k_genes", "10", "--per_device_train_batch_size", "8",
            "--learning_rate", "5e-3", "--max_steps", "30", "--logging_steps", "10",
            "--max_eval_samples", "16", "--disable_tqdm", "True", "--seed", "3",
            "--report_to", "none"]
    return [
        ("retrieve", ["retrieve_example_data.py", "--dataset", "pbmc68k_reduced",
                      "--output_dir", data]),
        ("transform", ["transform.py", "--data_filepath", h5ad, "--output_dir", data]),
        ("train", ["train.py", "--data_dir", hf, "--output_dir", model.parent,
                   "--run_name", model.name, *tiny]),
        ("predict_split", ["predict.py", "--model_dir", model, "--data_dir", hf,
                           "--split", "test", "--output_dir", run / "predictions" / "test"]),
        ("predict_h5ad", ["predict.py", "--model_dir", model, "--h5ad", h5ad,
                          "--output_dir", run / "predictions" / "h5ad"]),
        ("generate", ["generate.py", "--model_dir", model, "--data_dir", hf,
                      "--n_per_type", "2", "--output_dir", gen]),
        ("embed", ["embed.py", "--model_dir", model, "--data_dir", hf, "--split", "test",
                   "--output_dir", run / "embeddings"]),
        ("inverse_test", ["inverse.py", "--sentences", data / "cell_sentences" / "test.txt",
                          "--transform_dir", data, "--output", run / "inverse" / "test.h5ad",
                          "--evaluate"]),
        ("inverse_generated", ["inverse.py", "--sentences", gen / "generated_cells.txt",
                               "--labels", gen / "generated_labels.txt",
                               "--labels_key", "requested_cell_type", "--transform_dir", data,
                               "--output", run / "inverse" / "generated.h5ad", "--evaluate"]),
        ("eval_prediction", ["eval/prediction.py", "--predictions",
                             run / "predictions" / "test" / "predictions.csv",
                             "--transform_dir", data, "--output_dir", run / "eval" / "prediction"]),
        ("eval_generation", ["eval/generation.py", "--generated_dir", gen, "--data_dir", hf,
                             "--output_dir", run / "eval" / "generation"]),
        ("eval_embedding", ["eval/embedding.py", "--embeddings",
                            run / "embeddings" / "embeddings.h5ad", "--transform_dir", data,
                            "--output_dir", run / "eval" / "embedding"]),
        ("eval_reconstruction", ["eval/reconstruction.py", "--transform_dir", data,
                                 "--output_dir", run / "eval" / "reconstruction"]),
    ]


def environment(checkout: Path, work: Path) -> dict[str, str]:
    """The parent's environment with everything that could make two runs differ pinned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CUDA"))}
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")}
    offline = {k: "1" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(threads, **offline, PYTHONPATH=str(checkout), PYTHONHASHSEED="0",
               CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg",
               MPLCONFIGDIR=str(work / "mplconfig"), HF_HOME=str(work / "hf_home"),
               SOURCE_DATE_EPOCH="0", TZ="UTC")
    return env


def run_side(checkout: Path, work: Path, side: str) -> tuple[float, str | None]:
    """Run the pipeline with ``checkout`` into ``work/side``: (seconds, the failed step or None)."""
    run, logs = work / "run", work / f"logs_{side}"
    for folder in (run, logs, work / side):
        shutil.rmtree(folder, ignore_errors=True)
    run.mkdir(parents=True)
    logs.mkdir()
    env, start, failed = environment(checkout, work), time.perf_counter(), None
    for name, argv in pipeline(run):
        t0 = time.perf_counter()
        with (logs / f"{name}.log").open("w") as log:
            rc = subprocess.run([sys.executable, *map(str, argv)], cwd=checkout, env=env,
                                stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"  {side:6} {name:20} {time.perf_counter() - t0:6.1f} s"
              f"{'' if rc == 0 else f'  FAILED (rc {rc}, see {logs / name}.log)'}", flush=True)
        if rc != 0:
            failed = name
            break
    run.rename(work / side)
    return time.perf_counter() - start, failed


def is_record(rel: str) -> bool:
    return any(Path(rel).match(p) for p in RECORDS)


def drop_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: drop_timings(v) for k, v in obj.items() if not TIMING_KEY.search(str(k))}
    if isinstance(obj, list):
        return [drop_timings(v) for v in obj]
    return obj


def normalized(path: Path, roots: Sequence[str]) -> str:
    """Text of a file with the checkouts' and run's paths replaced, timing keys dropped."""
    raw = path.read_bytes()
    if path.suffix == ".bin":  # a pickle (training_args.bin): what it holds, as text
        import torch
        obj = torch.load(path, weights_only=False)
        text = json.dumps(obj.to_dict() if hasattr(obj, "to_dict") else repr(obj),
                          indent=1, sort_keys=True, default=repr)
    else:
        text = raw.decode("utf-8", errors="replace")
    for root in roots:
        text = text.replace(root, RUN_ROOT)
    if path.suffix == ".json":
        with contextlib.suppress(json.JSONDecodeError):
            text = json.dumps(drop_timings(json.loads(text)), indent=1, sort_keys=True)
    return text


def loaded_parts(path: Path, roots: Sequence[str]) -> dict[str, Any] | None:
    """What a binary data file holds, part by part, or None for a format not loaded here."""
    import numpy as np
    if path.suffix == ".npy":
        return {"array": np.load(path, allow_pickle=False)}
    if path.suffix == ".png":
        from PIL import Image
        with Image.open(path) as image:
            return {"pixels": np.asarray(image.convert("RGBA"))}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(path)
    if path.suffix == ".arrow":
        import pyarrow as pa
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        return {"schema": table.schema.remove_metadata(), "rows": table.replace_schema_metadata()}
    if path.suffix == ".h5ad":
        import anndata as ad
        adata = ad.read_h5ad(path)
        uns = repr(adata.uns)
        for root in roots:
            uns = uns.replace(root, RUN_ROOT)
        parts = {"X": adata.X, "obs": adata.obs, "var": adata.var, "uns": uns}
        for attr in ("obsm", "varm", "obsp", "layers"):
            parts |= {f"{attr}[{k}]": v for k, v in getattr(adata, attr).items()}
        return parts
    return None


def same_value(x: Any, y: Any) -> bool:
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    if type(x) is not type(y):
        return False
    if isinstance(x, pd.DataFrame):
        return x.equals(y) and list(x.columns) == list(y.columns) and x.index.equals(y.index)
    if sp.issparse(x):
        return x.shape == y.shape and x.dtype == y.dtype and (x != y).nnz == 0
    if isinstance(x, np.ndarray):
        return x.shape == y.shape and x.dtype == y.dtype and np.array_equal(
            x, y, equal_nan=x.dtype.kind in "fc")
    return x.equals(y) if hasattr(x, "equals") else x == y


def loaded_note(a: Path, b: Path, roots: Sequence[str]) -> str:
    """For a binary data file that differs: whether it holds the same once loaded (a hint)."""
    try:
        pa, pb = loaded_parts(a, roots), loaded_parts(b, roots)
    except Exception as error:  # a hint only: the bytes already differ
        return f" (could not load: {error})"
    if pa is None or pb is None:
        return ""
    differ = sorted(k for k in pa.keys() | pb.keys()
                    if k not in pa or k not in pb or not same_value(pa[k], pb[k]))
    return f" (loaded: differs in {', '.join(differ)})" if differ else " (same once loaded)"


def compare(work: Path, before: Path, after: Path, new: Sequence[str] = ()) -> bool:
    """Print the table and the records' diffs; True when every data file is the same."""
    sides = {s: {str(p.relative_to(work / s)) for p in (work / s).rglob("*") if p.is_file()}
             for s in ("before", "after")}
    roots = [str(before), str(after), str(work / "run")]
    rows: dict[str, list[tuple[str, str]]] = {"data": [], "records": []}
    diffs: list[str] = []
    ok = True
    for rel in sorted(sides["before"] | sides["after"]):
        kind = "records" if is_record(rel) else "data"
        a, b = work / "before" / rel, work / "after" / rel
        if rel not in sides["before"] and any(fnmatch.fnmatch(rel, pattern) for pattern in new):
            status = "new output"
        elif rel not in sides["after"] or rel not in sides["before"]:
            status = "only in before" if rel in sides["before"] else "only in after"
        elif a.read_bytes() == b.read_bytes():
            status = "identical"
        elif (na := normalized(a, roots)) == (nb := normalized(b, roots)):
            status = "identical (paths, timings aside)"
        else:
            status = "DIFFERENT" if kind == "data" else "VALUES DIFFER"
            if kind == "data" and a.suffix in (".npy", ".png", ".safetensors", ".arrow", ".h5ad"):
                status += loaded_note(a, b, roots)
            if kind == "records" or a.suffix in (".json", ".csv", ".txt"):
                diffs += [f"--- {rel}", *list(difflib.unified_diff(
                    na.splitlines(), nb.splitlines(), "before", "after", lineterm="", n=1))[2:42]]
        ok &= kind == "records" or status.startswith("identical") or status == "new output"
        rows[kind].append((rel, status))
    for kind, entries in rows.items():
        width = max((len(r) for r, _ in entries), default=4)
        print(f"\n{kind} ({len(entries)} files)\n{'file':<{width}}  status\n{'-' * (width + 34)}")
        for rel, status in entries:
            print(f"{rel:<{width}}  {status}")
    if diffs:
        print("\ndifferences (after replacing paths with <RUN> and dropping timing keys):")
        print("\n".join(diffs))
    changed = [rel for rel, status in rows["records"] if status == "VALUES DIFFER"]
    if changed:
        print(f"\nrecords whose values (not only paths or timings) differ: {', '.join(changed)}")
    return ok


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the reference checkout")
    parser.add_argument("--after", type=Path, default=Path(), help="the changed checkout")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cmp"),
                        help="scratch folder (its run/, before/, after/, logs_*/ are replaced)")
    parser.add_argument("--new", nargs="*", default=[], metavar="GLOB",
                        help="outputs the change adds on purpose (paths under the run folder, fnmatch)")
    parser.add_argument("--compare_only", action="store_true",
                        help="compare the outputs already in --work without running anything")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    before, after, work = args.before.resolve(), args.after.resolve(), args.work.resolve()
    failed = []
    if not args.compare_only:
        work.mkdir(parents=True, exist_ok=True)
        for side, checkout in (("before", before), ("after", after)):
            seconds, step = run_side(checkout, work, side)
            print(f"{side} ({checkout}): {seconds:.0f} s" + (f", FAILED at {step}" if step else ""))
            failed += [f"{side}: {step}"] if step else []
    ok = compare(work, before, after, args.new)
    print(f"\nresult: {'no data output changed' if ok else 'DATA OUTPUTS DIFFER'}"
          + (f"; steps failed: {', '.join(failed)}" if failed else ""))
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
