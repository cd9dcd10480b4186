"""Near-duplicate lookup by perceptual hash without pairwise comparison: multi-index hashing.

A 64-bit perceptual hash is cut into ``m`` segments. If two hashes differ in at most ``r``
bits, at least one segment differs in at most ``r // m`` bits (pigeonhole). So each stored
hash is filed under its ``m`` segment values, and a lookup visits, per segment, the buckets
of every value within ``r // m`` bits of its own: a few dozen buckets, not every image.
The candidates found are then checked with the full Hamming distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

HASH_BITS = 64


def segment_bounds(segments: int) -> list[tuple[int, int]]:
    """(shift, width) of each segment, covering the 64 bits as evenly as possible."""
    base, extra = divmod(HASH_BITS, segments)
    bounds, shift = [], 0
    for i in range(segments):
        width = base + (1 if i < extra else 0)
        bounds.append((shift, width))
        shift += width
    return bounds


def within(value: int, width: int, radius: int) -> list[int]:
    """Every ``width``-bit value at Hamming distance <= ``radius`` from ``value`` (itself first)."""
    out = [value]
    for r in range(1, radius + 1):
        for bits in combinations(range(width), r):
            flipped = value
            for b in bits:
                flipped ^= 1 << b
            out.append(flipped)
    return out


@dataclass(frozen=True)
class NearDupQuery:
    """What a store needs to file one hash and find its near-duplicates."""

    hash: int  # the 64-bit perceptual hash
    max_distance: int  # Hamming distance at or under which two images are near-duplicates
    own_buckets: tuple[str, ...]  # where this hash is filed: "segment:value"
    probe_buckets: tuple[str, ...]  # where its near-duplicates can be

    @property
    def hi(self) -> int:
        """The upper 32 bits as a signed int (Redis Lua's bit library works on signed 32-bit)."""
        return _signed32(self.hash >> 32)

    @property
    def lo(self) -> int:
        return _signed32(self.hash & 0xFFFFFFFF)


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def near_dup_query(phash: int, max_distance: int, segments: int) -> NearDupQuery:
    """The buckets to file ``phash`` under and to probe for hashes within ``max_distance`` bits."""
    radius = max_distance // segments
    own, probe = [], []
    for index, (shift, width) in enumerate(segment_bounds(segments)):
        value = (phash >> shift) & ((1 << width) - 1)
        own.append(f"{index}:{value}")
        probe += [f"{index}:{v}" for v in within(value, width, radius)]
    return NearDupQuery(phash, max_distance, tuple(own), tuple(probe))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
