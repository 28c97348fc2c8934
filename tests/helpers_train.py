"""Small synthetic cell-sentence datasets for the train.py tests (no network, no h5ad)."""

from __future__ import annotations

import random
from pathlib import Path

MARKERS: dict[str, list[str]] = {
    "CD14+ Monocyte": ["CD14", "LYZ", "S100A8", "S100A9", "FCN1", "VCAN", "CST3", "HLA-DRA"],
    "B cell": ["CD79A", "MS4A1", "CD79B", "BANK1", "IGHM", "CD74", "TCL1A", "HLA-DQA1"],
    "CD4 T cell": ["IL7R", "CD3E", "CD3D", "LTB", "TCF7", "CCR7", "MAL", "LEF1"],
    "NK cell": ["NKG7", "GNLY", "GZMB", "PRF1", "KLRD1", "FGFBP2", "CTSW", "GZMA"],
}
BACKGROUND: list[str] = [f"GENE{i:03d}" for i in range(150)] + ["MT-CO1", "MT-ND4", "RPL13A"]


def make_sentences(
    n_cells: int, *, n_genes: int = 60, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Cell sentences whose first genes are the (shuffled) markers of their cell type."""
    rng = random.Random(seed)
    types = list(MARKERS)
    sentences, labels = [], []
    for i in range(n_cells):
        cell_type = types[i % len(types)]
        markers = MARKERS[cell_type][:]
        rng.shuffle(markers)
        rest = rng.sample(BACKGROUND, n_genes - len(markers))
        sentences.append(" ".join(markers + rest))
        labels.append(cell_type)
    return sentences, labels


def make_dataset_dir(
    path: Path,
    *,
    n_train: int = 240,
    n_valid: int = 40,
    n_test: int = 40,
    n_genes: int = 60,
    with_cell_type: bool = True,
    seed: int = 0,
) -> Path:
    """Write a DatasetDict like transform.py's ``cell_sentences_hf/`` to ``path``."""
    from datasets import Dataset, DatasetDict

    splits = {}
    for offset, (split, n) in enumerate(
        [("train", n_train), ("valid", n_valid), ("test", n_test)]
    ):
        sentences, labels = make_sentences(n, n_genes=n_genes, seed=seed + offset)
        columns: dict[str, list[str]] = {
            "cell_name": [f"{split}_cell{i}" for i in range(n)],
            "cell_sentence": sentences,
        }
        if with_cell_type:
            columns["cell_type"] = labels
        splits[split] = Dataset.from_dict(columns)
    DatasetDict(splits).save_to_disk(str(path))
    return path
