"""Fixtures shared by the training and generation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_train import make_dataset_dir


@pytest.fixture(scope="module")
def one_thread():
    # Tiny models train several times faster on one thread of a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small cell-sentence DatasetDict with marker genes per cell type."""
    return make_dataset_dir(tmp_path_factory.mktemp("data") / "cell_sentences_hf")
