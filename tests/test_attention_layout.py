import pickle

import pytest
import torch

from lightning_dhp.attention import ZigzagLayout

PACK = [13, 0, 3, 1, 24, 0, 7]


@pytest.mark.parametrize("degree", [1, 2, 3, 4, 5, 6, 7, 8])
def test_shard_unshard_round_trip_and_positions(degree):
    x = torch.randn(sum(PACK), 2, 3)
    layouts = [ZigzagLayout(PACK, degree, rank) for rank in range(degree)]
    parts = [layout.shard(x, pad_value=float("nan")) for layout in layouts]
    assert torch.equal(layouts[0].unshard(parts), x)
    starts = [sum(PACK[:i]) for i in range(len(PACK))]
    for layout, part in zip(layouts, parts, strict=True):
        assert layout.padded_lens == tuple(
            length if degree == 1 else -(-length // (2 * degree)) * 2 * degree for length in PACK
        )
        assert layout.num_local_tokens == sum(layout.padded_lens) // degree == part.shape[0]
        assert torch.equal(
            layout.local_cu_seqlens[1:] - layout.local_cu_seqlens[:-1],
            torch.tensor(layout.padded_lens) // degree,
        )
        assert torch.isnan(part[~layout.valid]).all()
        lens = torch.tensor(PACK)[layout.sequence_ids]
        assert torch.equal(layout.valid, layout.position_ids < lens)
        for row in torch.nonzero(layout.valid).flatten().tolist():
            sequence = int(layout.sequence_ids[row])
            assert torch.equal(part[row], x[starts[sequence] + int(layout.position_ids[row])])


def test_rank_keeps_chunks_r_and_mirror():
    layout = ZigzagLayout([12], 3, 1)  # 6 chunks of 2: rank 1 keeps chunks 1 and 4
    assert layout.position_ids.tolist() == [2, 3, 8, 9]
    assert layout.valid.all()
    short = ZigzagLayout([2, 0], 3, 2)  # padded to 6, chunks of 1: rank 2 keeps positions 2 and 3
    assert short.position_ids.tolist() == [2, 3]
    assert short.valid.tolist() == [False, False]
    assert short.sequence_ids.tolist() == [0, 0]


def test_shard_is_differentiable_and_keeps_dtype():
    x = torch.arange(10, dtype=torch.float64, requires_grad=True)
    ZigzagLayout([4, 6], 2, 0).shard(x).sum().backward()
    assert x.grad.tolist() == [1, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    labels = ZigzagLayout([3], 2, 1).shard(torch.tensor([5, 6, 7]), pad_value=-100)
    assert labels.dtype == torch.long and labels.tolist() == [6, 7]
    assert ZigzagLayout([3], 2, 0).shard(torch.tensor([5, 6, 7]), pad_value=-100).tolist() == [5, -100]


def test_pickle_and_equality():
    layout = ZigzagLayout([5, 0, 9], 4, 3)
    clone = pickle.loads(pickle.dumps(layout))
    assert clone == layout and torch.equal(clone.position_ids, layout.position_ids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([3, -1], 2, 0), "sequence 1 has negative length -1"),
        (([3], 2, 2), "rank 2 is outside the group of degree 2"),
        (([3], 0, 0), "degree must be >= 1, got 0"),
    ],
)
def test_bad_layout_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        ZigzagLayout(*args)


def test_bad_shard_and_unshard_inputs():
    layout = ZigzagLayout([3, 4], 2, 0)
    with pytest.raises(ValueError, match=r"x has 6 rows .* sum\(seq_lens\) = 7"):
        layout.shard(torch.zeros(6))
    with pytest.raises(ValueError, match="got 1 shards for a group of degree 2"):
        layout.unshard([torch.zeros(4)])
    with pytest.raises(ValueError, match="shard 1 has 3 rows, its layout holds 4"):
        layout.unshard([torch.zeros(4), torch.zeros(3)])
