"""DHPBatchSampler: same batches everywhere, every sample once per epoch, exact resume."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dhp.lightning import DHPBatchSampler


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(1, 200), batch_size=st.integers(1, 64), seed=st.integers(0, 10),
       epoch=st.integers(0, 5), drop_last=st.booleans(), shuffle=st.booleans())
def test_every_sample_exactly_once_per_epoch(num_samples, batch_size, seed, epoch, drop_last, shuffle):
    sampler = DHPBatchSampler([1] * num_samples, batch_size, seed=seed, drop_last=drop_last, shuffle=shuffle)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = [index for batch in batches for index in batch]
    assert len(seen) == len(set(seen))
    if drop_last:
        assert all(len(batch) == batch_size for batch in batches)
        assert len(seen) == num_samples - num_samples % batch_size
    else:
        assert sorted(seen) == list(range(num_samples))


@settings(max_examples=40, deadline=None)
@given(num_samples=st.integers(2, 100), batch_size=st.integers(1, 16), stop=st.integers(0, 20),
       epoch=st.integers(0, 3))
def test_resume_continues_with_the_same_batches(num_samples, batch_size, stop, epoch):
    lengths = list(range(1, num_samples + 1))
    uninterrupted = DHPBatchSampler(lengths, batch_size, seed=7)
    uninterrupted.set_epoch(epoch)
    expected = list(uninterrupted)
    stop = min(stop, len(expected))

    first = DHPBatchSampler(lengths, batch_size, seed=7)
    first.set_epoch(epoch)
    iterator = iter(first)
    consumed = [next(iterator) for _ in range(stop)]
    state = first.state_dict()

    resumed = DHPBatchSampler(lengths, batch_size, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # Lightning sets the (same) epoch again on restart
    assert consumed + list(resumed) == expected


def test_same_batches_for_every_instance_and_new_order_per_epoch():
    a, b = DHPBatchSampler(range(1, 50), 8, seed=3), DHPBatchSampler(range(1, 50), 8, seed=3)
    assert list(a) == list(b)
    first_epoch = list(a)
    a.set_epoch(1)
    assert list(a) != first_epoch


def test_bad_arguments_and_mismatched_resume_are_clear():
    with pytest.raises(ValueError, match="global_batch_size must be >= 1"):
        DHPBatchSampler([1, 2], 0)
    with pytest.raises(ValueError, match="lengths is empty"):
        DHPBatchSampler([], 4)
    state = DHPBatchSampler([1, 2, 3], 2).state_dict()
    with pytest.raises(ValueError, match="saw 3 samples, this dataset has 4"):
        DHPBatchSampler([1, 2, 3, 4], 2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size=2"):
        DHPBatchSampler([1, 2, 3], 3).load_state_dict(state)


@pytest.mark.parametrize(("patches", "fragment"), [
    ([4, 0], r"vision_patches has 2 entries but there are 3 lengths"),
    ([4, -1, -2], r"dataset items \[1, 2\] have negative vision patch counts \(vision_patches\[1\] = -1"),
    ([4, 2.5, 0], r"vision patch counts must be whole numbers; dataset items \[1\]"),
])
def test_bad_vision_patches_name_the_dataset_items(patches, fragment):
    from lightning_dhp.errors import DHPDataError

    with pytest.raises(DHPDataError, match=fragment):
        DHPBatchSampler([3, 5, 7], 2, vision_patches=patches)


def test_vision_patches_reach_the_planner_from_the_dataset_attribute():
    import torch

    from lightning_dhp.lightning import DHPDataLoader, DHPPacking, dhp_dataloader
    from lightning_dhp.lightning.planned_loader import PlanConfig, StepRequest
    from lightning_dhp.planner import CostModel, PlanError

    class Videos(torch.utils.data.Dataset):
        lengths, vision_patches = [6, 9, 4], [0, 32, 8]

        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> dict:
            return {"input_ids": torch.zeros(self.lengths[index], dtype=torch.long)}

    loader = dhp_dataloader(Videos(), Videos.lengths, 3)
    assert loader.batch_sampler.vision_patches == [0, 32, 8]
    vision = CostModel(vision_s_per_patch=1e-3)
    planned = DHPDataLoader(Videos(), loader.batch_sampler, PlanConfig(2, 0, 16, cost_model=vision), DHPPacking(), {})
    step = planned.dataset[StepRequest("x", 0, 0, (1, 2))]
    assert list(step.plan.vision_patches) == [32, 8]
    budget = PlanConfig(2, 0, 16, cost_model=vision, vision_patches_per_device=10)
    with pytest.raises(PlanError, match=r"dataset sample 1 cannot be trained: .*32 vision patches"):
        DHPDataLoader(Videos(), loader.batch_sampler, budget, DHPPacking(), {})  # it needs 4 devices, there are 2
