"""Fetch example single-cell data: the Domínguez Conde et al. 1,000-cell sample, offline scanpy's pbmc68k_reduced.

Google Drive or scanpy -> ``<output_dir>/<name>.h5ad`` and ``<output_dir>/.example_path`` (its path).

Example::

    python retrieve_example_data.py                       # Domínguez Conde, or pbmc68k offline
    python retrieve_example_data.py --dataset pbmc68k_reduced --output_dir data
"""

from __future__ import annotations

import startup_guard  # noqa: F401  # isort: skip  (first: Ctrl-C while the rest loads is one line)

import argparse
import logging
import shlex
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from utils import cli
from utils.contract import EXAMPLE
from utils.transform import example_data

logger = logging.getLogger("cell2sentence")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.script_parser(__doc__)
    parser.add_argument("--dataset", type=str, default="auto", choices=["auto", "dominguez", "pbmc68k_reduced"],
                        help="auto: download the Domínguez Conde sample, or use scanpy's bundled pbmc68k_reduced "
                             "when offline; dominguez: download only; pbmc68k_reduced: the bundled dataset.")
    parser.add_argument("--output_dir", type=Path, default=Path("data"), help="Folder the h5ad file is written to.")
    parser.add_argument("--force", action="store_true", help="Fetch (or rewrite) the file even when it exists.")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="Seconds to wait for the server (connection and between bytes).")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}; try --timeout 60.")
    return args


def _reuse(dest: Path) -> bool:
    """True when ``dest`` exists and is a valid example file (an invalid one is an error)."""
    if not dest.exists():
        return False
    adata = example_data.check_example_h5ad(dest)
    logger.info("%s already exists (%s cells x %s genes); not fetching it again (pass --force to).",
                dest, f"{adata.n_obs:,}", f"{adata.n_vars:,}")
    return True


def retrieve_dominguez(output_dir: Path, *, force: bool, timeout: float) -> Path:
    """Download the Domínguez Conde sample to ``output_dir`` unless it is already there."""
    dest = output_dir / example_data.DOMINGUEZ_FILENAME
    if not force and _reuse(dest):
        return dest
    logger.info("Downloading the Domínguez Conde et al. 1,000-cell sample (Google Drive id %s) to %s.",
                example_data.DOMINGUEZ_GDRIVE_ID, dest)
    download = partial(example_data.download_from_drive, example_data.DOMINGUEZ_GDRIVE_ID, timeout=timeout)
    adata = example_data.fetch_to_file(download, dest)
    logger.info("Downloaded %s: %s cells x %s genes.", dest, f"{adata.n_obs:,}", f"{adata.n_vars:,}")
    return dest


def retrieve_pbmc68k_reduced(output_dir: Path, *, force: bool) -> Path:
    """Write scanpy's bundled pbmc68k_reduced, prepared for transform.py, to ``output_dir``."""
    dest = output_dir / example_data.PBMC68K_FILENAME
    if not force and _reuse(dest):
        return dest
    adata = example_data.prepare_pbmc68k_reduced()
    example_data.write_h5ad_atomically(adata, dest)
    logger.info("Wrote scanpy's bundled pbmc68k_reduced to %s: %s cells x %s genes, %d cell types in "
                "obs['cell_type'], natural-log log1p values in .X and .raw.X.",
                dest, f"{adata.n_obs:,}", f"{adata.n_vars:,}", adata.obs["cell_type"].nunique())
    return dest


def main(args: argparse.Namespace) -> Path:
    """Retrieve the chosen dataset, record its path in ``.example_path`` and return the path."""
    output_dir: Path = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.dataset == "pbmc68k_reduced":
        path = retrieve_pbmc68k_reduced(output_dir, force=args.force)
    else:
        try:
            path = retrieve_dominguez(output_dir, force=args.force, timeout=args.timeout)
        except example_data.DownloadUnavailable as err:
            if args.dataset == "dominguez":
                raise cli.InputError(f"Could not download the Domínguez Conde sample ({err}); check the internet "
                                     "connection or use --dataset pbmc68k_reduced.") from err
            logger.warning("The network is unreachable (%s), so falling back to scanpy's bundled "
                           "pbmc68k_reduced (700 PBMCs).", err)
            path = retrieve_pbmc68k_reduced(output_dir, force=args.force)
    pointer = output_dir / EXAMPLE.path
    example_data.write_text_atomically(f"{path.resolve()}\n", pointer)
    command = shlex.join(["python", "transform.py", "--data_filepath", str(path), "--output_dir", str(output_dir)])
    logger.info("Example data: %s (path recorded in %s).", path, pointer)
    logger.info("Next: %s", command)
    return path


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
