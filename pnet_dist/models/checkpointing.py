"""Activation checkpointing of one module call that leaves the module's buffers as one forward would.

torch.utils.checkpoint keeps only a segment's inputs and runs the segment's forward again during
backward. The non-reentrant form used here restores the RNG state for that recomputation (so
dropout and drop-path draw the same masks). It does not protect buffers: a BatchNorm in training
mode would add the batch statistics to its running mean/var a second time, and count the batch
twice in num_batches_tracked. `checkpointed` snapshots the module's buffers when the recomputation
starts and puts them back when it ends; the recomputation's outputs do not depend on the running
statistics (training-mode BatchNorm normalises with the batch's own), so gradients are unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed(module: nn.Module, *args: torch.Tensor):
    """module(*args), keeping only `args` for backward and recomputing the rest there."""
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(module)))


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
