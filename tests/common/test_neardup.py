"""Multi-index hashing: the band radii find every hash within the distance, and probe no more than that needs."""

from __future__ import annotations

import itertools

import pytest

from imgsift_common.neardup import band_radii, within

BANDS, BAND_BITS = 4, 16  # the job-state store's (imgsift_common.schema.PHASH_BANDS / PHASH_BAND_BITS)


def test_within_enumerates_the_hamming_ball() -> None:
    ball = within(0b1010, 4, 1)
    assert sorted(ball) == sorted([0b1010, 0b1011, 0b1000, 0b1110, 0b0010])
    assert len(within(0, 16, 2)) == 1 + 16 + 16 * 15 // 2


def _found(radii: tuple[int, ...], split: tuple[int, ...]) -> bool:
    """Whether a hash whose bands differ by ``split`` bits from the query's is in some probed band's ball."""
    return any(bits <= radius for bits, radius in zip(split, radii, strict=True))


@pytest.mark.parametrize("max_distance", range(0, 20))
def test_every_split_of_the_distance_over_the_bands_is_found(max_distance: int) -> None:
    # Every way two hashes within max_distance bits can differ, band by band: the pigeonhole
    # argument checked exhaustively, for the radii the store probes.
    radii = band_radii(max_distance, BANDS)
    splits = [s for s in itertools.product(range(max_distance + 1), repeat=BANDS) if sum(s) <= max_distance]
    assert all(_found(radii, split) for split in splits)


@pytest.mark.parametrize("max_distance", range(0, 20))
def test_no_band_probes_more_than_the_distance_needs(max_distance: int) -> None:
    # Lowering any band's radius by one leaves a split of the distance unfound, so the probes are
    # the fewest such radii allow; and they are no more than the old radius d // 4 on every band.
    radii = band_radii(max_distance, BANDS)
    assert sum(r + 1 for r in radii) == max_distance + 1
    assert all(r <= max_distance // BANDS for r in radii)
    for band in (b for b, r in enumerate(radii) if r >= 0):
        lower = tuple(r - (i == band) for i, r in enumerate(radii))
        missed = tuple(r + 1 for r in lower)  # each band off by one more bit than it probes (0: not probed)
        assert sum(missed) <= max_distance and not _found(lower, missed)


def test_the_default_distance_probes_52_band_values_not_68() -> None:
    probed = sum(len(within(0, BAND_BITS, r)) for r in band_radii(6, BANDS) if r >= 0)
    assert band_radii(6, BANDS) == (1, 1, 1, 0) and probed == 3 * 17 + 1
    assert band_radii(2, BANDS) == (0, 0, 0, -1)  # the fourth band is not probed at all
