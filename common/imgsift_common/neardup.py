"""Near-duplicate lookup by perceptual hash without pairwise comparison: multi-index hashing.

A 64-bit perceptual hash is cut into bands (the job-state store keeps four of 16 bits, each
indexed). Give band ``i`` a radius ``r_i`` such that the ``r_i + 1`` add up to more than the
largest distance ``d`` looked for: then two hashes within ``d`` bits agree within ``r_i`` bits on
at least one band ``i`` (pigeonhole: were every band off by ``r_i + 1`` bits or more, the hashes
would differ by more than ``d``). So a lookup visits, per band, only the values within its radius
of its own: a few dozen index entries, never every image of the job; the candidates found are
then checked with the full Hamming distance. The radii are as even as that sum allows
(:func:`band_radii`): for the default ``d`` = 6, three bands at radius 1 and one at 0 (52 band
values probed, not the 68 of radius 1 everywhere); for ``d`` = 2, three bands at 0 and none probed
on the fourth.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

HASH_BITS = 64


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


def band_radii(max_distance: int, bands: int) -> tuple[int, ...]:
    """Per band, the radius a lookup for hashes within ``max_distance`` bits probes (-1: the band is not probed).

    The smallest radii whose ``r + 1`` add up to ``max_distance + 1``, as even as possible, the
    larger ones first: what the pigeonhole argument above needs, and no more."""
    even, extra = divmod(max_distance + 1, bands)
    return tuple(even - 1 + (1 if i < extra else 0) for i in range(bands))


@dataclass(frozen=True)
class NearDupQuery:
    """A kept image's perceptual hash, and the distance at or under which another is its near-duplicate."""

    hash: int  # the 64-bit perceptual hash
    max_distance: int  # Hamming distance at or under which two images are near-duplicates


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
