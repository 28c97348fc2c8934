"""Several processes under ``torchrun``: each takes every N-th cell, rank 0 gathers the results
in the cells' order and writes. Without torchrun it is one process and every call the identity."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("cell2sentence")


def _leave_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def leave_group_at_exit() -> None:
    """Destroy the process group at exit, while Python is still whole: a gloo group left alive
    aborts the process now and then ("terminate called without an active exception")."""
    atexit.unregister(_leave_group)  # once, however often a run is started in one process
    atexit.register(_leave_group)


@dataclass
class Processes:
    """This process's place among the processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def start(cls) -> Processes:
        """Join the process group when started by torchrun; other ranks log warnings only."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():  # NCCL's collectives run on the current device
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        leave_group_at_exit()
        procs = cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        if not procs.main:
            logger.setLevel(logging.WARNING)
        return procs

    @property
    def main(self) -> bool:
        return self.rank == 0

    def require_one(self, flag: str) -> None:
        """Refuse ``flag`` under several processes, for work one process does."""
        if self.world_size > 1:
            from utils.cli import InputError

            raise InputError(f"{flag} runs in one process; run it without torchrun.")

    def describe(self) -> str:
        return f", {self.world_size} processes" if self.world_size > 1 else ""

    def device(self, requested: str) -> str:
        """The device of this process: its own GPU under torchrun, else as requested."""
        import torch

        if self.world_size > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def share(self, n: int) -> np.ndarray:
        """The indices of this process's cells among ``n``."""
        return np.arange(self.rank, n, self.world_size)

    def gather(self, indices: np.ndarray, result: Any, n: int) -> Any:
        """Every process's ``LabelPredictions``, list or array in the cells' order on rank 0, else None."""
        if self.world_size == 1:
            return result
        import torch.distributed as dist

        from utils.models.cell_model import LabelPredictions

        if isinstance(result, LabelPredictions):  # each field gathered as a list or rows of cells
            labels, scores, p = (self.gather(indices, x, n) for x in
                                 (result.labels, result.scores, result.probabilities.to_numpy()))
            return None if labels is None else LabelPredictions(
                result.column, labels, scores, pd.DataFrame(p, columns=result.probabilities.columns))
        parts: list[Any] = [None] * self.world_size if self.main else None
        dist.gather_object((indices, result), parts, dst=0)
        # A sender may return before rank 0 has its data, and exiting with a send in flight may
        # be what still aborted a gloo process now and then; after the barrier all has arrived.
        dist.barrier()
        if not self.main:
            return None
        position = np.argsort(np.concatenate([p[0] for p in parts]))  # the inverse of the share's order
        if isinstance(result, np.ndarray):  # rows of cells, e.g. embeddings
            return np.concatenate([p[1] for p in parts])[position]
        merged = [x for p in parts for x in p[1]]
        return [merged[i] for i in position]
