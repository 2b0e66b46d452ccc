"""Token compaction: the reference kernel and the order the boundary engine compacts in."""

import torch
from vtprune.kernels import gather_tokens

from vtprune.boundary import compaction_order


def test_gather_tokens_matches_a_loop_over_rows():
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 5, dtype=torch.bfloat16)
    ids = torch.randint(0, 100, (3, 11))
    index = torch.stack([torch.randperm(11)[:4].sort().values for _ in range(3)])
    got_hidden, got_ids = gather_tokens([hidden, ids], index)
    for b in range(3):
        assert torch.equal(got_hidden[b], hidden[b, index[b]])
        assert torch.equal(got_ids[b], ids[b, index[b]])


def test_compaction_order_repads_on_the_left_keeping_order():
    keep = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    order = compaction_order(keep, left_padded=True)
    assert order.shape == (2, 4)
    assert order[0].tolist() == [1, 2, 4, 5]
    assert order[1, 2:].tolist() == [2, 5] and not keep[1, order[1, :2]].any()


def test_compaction_order_repads_on_the_right():
    keep = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    order = compaction_order(keep, left_padded=False)
    assert order[0].tolist() == [0, 1, 3]
    assert order[1, 0].item() == 0 and not keep[1, order[1, 1:]].any()
