"""Two-level shuffle for lazily read datasets: block order first, then rows within a block.

A fully random epoch over an object store touches a different inner chunk for nearly every
row, so every batch costs about ``batch_size`` ranged requests. Shuffling the order of blocks
of consecutive rows (aligned to the inner chunks), then the rows inside each block, keeps an
epoch random at the block level while a batch of ``batch_size`` rows touches about
``batch_size / block_rows`` blocks, and an epoch reads each block once.

The order is a pure function of ``(n, block_rows, seed, epoch)``: every rank and worker that
computes it gets the same permutation, so a distributed sampler can split it as usual.
"""

from __future__ import annotations

import torch


def block_shuffled_order(n: int, block_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of ``range(n)``: blocks of ``block_rows`` consecutive positions in a random
    order, the positions inside each block shuffled too (deterministic from seed and epoch)."""
    if n < 0 or block_rows < 1:
        raise ValueError(f"block_shuffled_order: need n >= 0 and block_rows >= 1, got {n}, "
                         f"{block_rows}")
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) & ((1 << 63) - 1))
    n_blocks = -(-n // block_rows)
    blocks = torch.randperm(n_blocks, generator=g)
    # one random key per row inside its block: sorting (block rank, key) shuffles within blocks
    rank_of_block = torch.empty(n_blocks, dtype=torch.int64)
    rank_of_block[blocks] = torch.arange(n_blocks)
    pos = torch.arange(n)
    key = rank_of_block[pos // block_rows].double() + torch.rand(n, generator=g, dtype=torch.float64)
    return torch.argsort(key)


def block_shuffled_indices(indices: torch.Tensor, block_rows: int, seed: int,
                           epoch: int) -> torch.Tensor:
    """``indices`` (e.g. a split's pair rows, sorted) in block-shuffled order: blocks are runs of
    ``block_rows`` consecutive entries of ``indices``."""
    order = block_shuffled_order(int(indices.shape[0]), block_rows, seed, epoch)
    return indices[order]
