"""The exact weight fingerprints behind the push check (minigrpo/checksum.py), on hand-made tensors."""

import torch

from minigrpo.checksum import bits_sum, fingerprint, fused_row_weighted_sum, row_weighted_sum


def test_row_weighted_sum_by_hand():
    # int32 words are the values themselves: rows [1, 2] and [3, 4] sum to 3 and 7; 1 x 3 + 2 x 7 = 17
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    assert bits_sum(t) == 10 and row_weighted_sum(t) == 17
    assert row_weighted_sum(t.t()) == 1 * 4 + 2 * 6  # transposed: rows [1, 3], [2, 4]; the bits sum stays 10
    assert fingerprint(t) == (10, 4, 17, 2) and fingerprint(torch.tensor(5, dtype=torch.int32)) == (5, 1, 5, 1)


def test_it_composes_across_fusion_and_sees_what_the_plain_sum_cannot():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(r, 8, generator=g) for r in (8, 4, 4))
    fused = torch.cat([q, k, v])  # vLLM's qkv_proj
    parts = [fingerprint(q), fingerprint(k), fingerprint(v)]
    assert row_weighted_sum(fused) == fused_row_weighted_sum(parts) and bits_sum(fused) == sum(p[0] for p in parts)
    # zero padding rows at the end (vLLM's vocabulary padding) add nothing
    assert row_weighted_sum(torch.cat([fused, torch.zeros(3, 8)])) == row_weighted_sum(fused)
    # k and v swapped inside the fused weight, or q transposed: the same bits sum, another row-weighted sum
    swapped = torch.cat([q, v, k])
    assert bits_sum(swapped) == bits_sum(fused) and row_weighted_sum(swapped) != row_weighted_sum(fused)
    square = torch.randn(8, 8, generator=g)
    assert bits_sum(square.t()) == bits_sum(square) and row_weighted_sum(square.t()) != row_weighted_sum(square)
    # one ulp anywhere changes both
    bumped = fused.clone()
    bumped[5, 3] = torch.nextafter(bumped[5, 3], torch.tensor(float("inf")))
    assert bits_sum(bumped) != bits_sum(fused) and row_weighted_sum(bumped) != row_weighted_sum(fused)


def test_large_rows_are_summed_exactly():
    # 10,000 rows of the largest int32: (r + 1) x row sum passes 2**63 (the chunks add Python ints)
    t = torch.full((10_000, 4), 2**31 - 1, dtype=torch.int32)
    assert row_weighted_sum(t) == sum((r + 1) * 4 * (2**31 - 1) for r in range(10_000))
