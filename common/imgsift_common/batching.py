"""Batch sizes a model sees: few of them, because each new one costs memory the process keeps.

On the CPU, torch (and oneDNN under it) keeps buffers per input shape: a MobileNetV2 trunk fed
every batch size from 1 to 64 grew from 0.8 to 3.6 GB (``bench/batch_shapes_memory.py``), and
a worker's batches do come in every size (a message's crops or images, less what a
redelivery finds done). Cutting each batch into full batches and powers of two keeps the
shapes to a handful, pads nothing, and gives the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, Self, TypeVar


class _Sliceable(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: slice, /) -> Self: ...


S = TypeVar("S", bound=_Sliceable)


def forward_sizes(n: int, batch_size: int) -> list[int]:
    """Batch sizes that add up to ``n``: ``batch_size`` while it fits, the rest in powers of two,
    largest first (23 rows in batches of 32: 16, 4, 2, 1). The model so sees at most
    ``batch_size`` and the powers of two below it."""
    sizes = [batch_size] * (n // batch_size)
    rest = n % batch_size
    while rest:
        power = 1 << (rest.bit_length() - 1)
        sizes.append(power)
        rest -= power
    return sizes


def in_batches(items: S, batch_size: int) -> Iterator[S]:
    """Consecutive slices of ``items`` (a list, an array) of the sizes ``forward_sizes`` gives."""
    start = 0
    for size in forward_sizes(len(items), batch_size):
        yield items[start : start + size]
        start += size
