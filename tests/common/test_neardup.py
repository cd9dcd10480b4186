"""Multi-index hashing finds every hash within the distance, and looks at a few buckets only."""

from __future__ import annotations

import itertools
import random

import pytest

from imgsift_common.neardup import hamming, near_dup_query, segment_bounds, within


def test_segments_cover_the_64_bits() -> None:
    for m in (1, 2, 3, 4, 5, 7, 8):
        bounds = segment_bounds(m)
        assert sum(w for _, w in bounds) == 64 and bounds[0][0] == 0
        assert all(s2 == s1 + w1 for (s1, w1), (s2, _) in itertools.pairwise(bounds))


def test_within_enumerates_the_hamming_ball() -> None:
    ball = within(0b1010, 4, 1)
    assert sorted(ball) == sorted([0b1010, 0b1011, 0b1000, 0b1110, 0b0010])
    assert len(within(0, 16, 2)) == 1 + 16 + 16 * 15 // 2


@pytest.mark.parametrize(("max_distance", "segments"), [(6, 4), (8, 4), (3, 4), (10, 6), (0, 2)])
def test_lookup_finds_exactly_what_brute_force_finds(max_distance: int, segments: int) -> None:
    rng = random.Random(max_distance * 100 + segments)
    stored = [rng.getrandbits(64) for _ in range(300)]
    # Plant near copies: flip up to max_distance bits of some stored hashes.
    for base in stored[:50]:
        flipped = base
        for bit in rng.sample(range(64), rng.randint(0, max_distance)):
            flipped ^= 1 << bit
        stored.append(flipped)
    index: dict[str, set[int]] = {}
    for i, h in enumerate(stored):
        for bucket in near_dup_query(h, max_distance, segments).own_buckets:
            index.setdefault(bucket, set()).add(i)
    for h in stored:
        query = near_dup_query(h, max_distance, segments)
        candidates = set().union(*(index.get(b, set()) for b in query.probe_buckets))
        found = {j for j in candidates if hamming(h, stored[j]) <= max_distance}
        expected = {j for j, other in enumerate(stored) if hamming(h, other) <= max_distance}
        assert found == expected
        assert len(candidates) < len(stored) or max_distance // segments > 2  # no scan of everything


def test_signed_halves_round_trip() -> None:
    h = 0xFEDCBA9876543210
    q = near_dup_query(h, 6, 4)
    assert ((q.hi & 0xFFFFFFFF) << 32) | (q.lo & 0xFFFFFFFF) == h
    assert -(2**31) <= q.hi < 2**31 and -(2**31) <= q.lo < 2**31
