"""sortLSH (hf_sparse_attn/methods/lsh.py): Gray order, angular locality, seeding, invalid keys last."""

import torch

from hf_sparse_attn.methods.lsh import gray_rank_table, lsh_ranks, make_generator, random_hyperplanes, sort_lsh


def test_gray_order_adjacent_buckets_differ_in_one_bit():
    P = 7
    rank = gray_rank_table(P)
    assert sorted(rank.tolist()) == list(range(1 << P))  # a permutation of the codes
    code_of_rank = torch.empty_like(rank)
    code_of_rank[rank] = torch.arange(1 << P)
    diff = code_of_rank[1:] ^ code_of_rank[:-1]
    assert all(bin(int(d)).count("1") == 1 for d in diff)


def test_similar_vectors_share_or_neighbour_buckets():
    g = make_generator(None, 0)
    x = torch.randn(1, 2, 2000, 32, generator=g)
    near = x + 0.05 * torch.randn(x.shape, generator=g)
    far = torch.randn(x.shape, generator=g)
    planes = random_hyperplanes(2, 32, 7, make_generator(None, 1), "cpu")
    rx, rn, rf = lsh_ranks(x, planes), lsh_ranks(near, planes), lsh_ranks(far, planes)
    same_near = (rx == rn).float().mean().item()
    same_far = (rx == rf).float().mean().item()
    assert same_near > 0.7 and same_far < 0.1, (same_near, same_far)


def test_seeded_and_reproducible():
    q, k = torch.randn(2, 3, 300, 16), torch.randn(2, 3, 300, 16)
    a = sort_lsh(q, k, 7, make_generator(None, 5))
    b = sort_lsh(q, k, 7, make_generator(None, 5))
    c = sort_lsh(q, k, 7, make_generator(None, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sort_lsh(q, k, 7, g1)[1], sort_lsh(q, k, 7, g2)[1])


def test_invalid_keys_sort_last_and_orders_are_permutations():
    q, k = torch.randn(2, 2, 100, 8), torch.randn(2, 2, 100, 8)
    valid = torch.ones(2, 100, dtype=torch.bool)
    valid[0, 10:30] = False
    q_order, k_order = sort_lsh(q, k, 5, make_generator(None, 0), valid)
    assert torch.equal(q_order.sort(-1).values, torch.arange(100).expand(2, 2, 100))
    assert set(k_order[0, 0, -20:].tolist()) == set(range(10, 30))
