import numpy as np
import pytest
import torch

from lightning_dhp.data.video_digits import (
    DIGIT_IDS,
    IMAGE_ID,
    TEXT_TOKENS_PER_SAMPLE,
    TOKEN_IDS,
    VideoDigits,
    decode,
    majority_digits,
)


def _items_equal(first: dict, second: dict) -> bool:
    return (
        all(torch.equal(first[key], second[key]) for key in ("input_ids", "labels", "visual_index"))
        and len(first["pixel_values"]) == len(second["pixel_values"])
        and all(torch.equal(a, b) for a, b in zip(first["pixel_values"], second["pixel_values"], strict=True))
        and first["answer"] == second["answer"]
    )


def test_same_seed_same_data_and_other_seed_other_data():
    first, again, other = VideoDigits(12, seed=3), VideoDigits(12, seed=3), VideoDigits(12, seed=4)
    np.testing.assert_array_equal(first.lengths, again.lengths)
    assert all(_items_equal(first[index], again[index]) for index in range(12))
    assert not np.array_equal(first.lengths, other.lengths)
    assert not _items_equal(first[0], other[0])


def test_items_match_lengths_and_hold_one_labelled_answer():
    dataset = VideoDigits(30, seed=0)
    for index in range(len(dataset)):
        item = dataset[index]
        input_ids, labels, visual_index = item["input_ids"], item["labels"], item["visual_index"]
        assert len(input_ids) == len(labels) == len(visual_index) == dataset.lengths[index]
        patches = sum((frame.shape[1] // 8) * (frame.shape[2] // 8) for frame in item["pixel_values"])
        visual_rows = visual_index > 0
        assert torch.equal(visual_index[visual_rows], torch.arange(1, patches + 1))
        assert torch.equal(visual_rows, input_ids == IMAGE_ID)
        assert len(input_ids) == patches + TEXT_TOKENS_PER_SAMPLE
        assert torch.equal(torch.nonzero(labels != -100).flatten(), torch.tensor([len(input_ids) - 1]))
        assert labels[-1] == input_ids[-1] == DIGIT_IDS[item["answer"]]
        assert decode(input_ids[-6:-1]).split()[-2] == item["question"]
        assert all(frame.dtype == torch.float32 and frame.shape[0] == 3 for frame in item["pixel_values"])


def test_frames_follow_the_stated_length_rule():
    durations = [1.0, 4.0, 100.0, 10_000.0]
    dataset = VideoDigits(200, seed=1, sample_fps=0.25, max_frames=128, durations_s=durations)
    assert set(dataset.num_frames.tolist()) == {1, 25, 128}
    tokens_per_frame = (dataset.frame_heights // 8) * (dataset.frame_widths // 8)
    np.testing.assert_array_equal(
        dataset.lengths, dataset.num_frames * tokens_per_frame + TEXT_TOKENS_PER_SAMPLE
    )


def test_default_lengths_come_from_activitynet_and_are_long_tailed():
    lengths = VideoDigits(3000, seed=0).lengths
    assert lengths.min() >= TEXT_TOKENS_PER_SAMPLE + 4
    assert lengths.max() <= 128 * 16 + TEXT_TOKENS_PER_SAMPLE
    assert np.percentile(lengths, 99) > 3 * np.median(lengths)


def test_majority_answer_holds_a_strict_majority():
    rng = np.random.default_rng(0)
    for num_frames in range(1, 40):
        for fraction in (0.1, 0.3, 0.5):
            answer = int(rng.integers(10))
            counts = np.bincount(majority_digits(answer, num_frames, fraction, rng), minlength=10)
            assert counts.sum() == num_frames
            assert counts[answer] > np.delete(counts, answer).max(), (num_frames, fraction, counts)


def test_last_question_answers_the_last_frame_digit():
    dataset = VideoDigits(40, seed=2, questions=("last",))
    for index in range(len(dataset)):
        digits, answer = dataset.frame_digits(index, np.random.default_rng([dataset.seed, index, 1]))
        assert answer == digits[-1] == dataset[index]["answer"]


def test_single_image_variant_has_one_frame_per_sample():
    dataset = VideoDigits.single_image(20, seed=0)
    assert (dataset.num_frames == 1).all()
    item = dataset[0]
    assert len(item["pixel_values"]) == 1
    assert item["input_ids"][1] == TOKEN_IDS["image"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"frame_sizes": (16, 20)}, r"frame_sizes \[20\].*patch_size=8"),
        ({"questions": ("most", "count")}, r"subset of \['most', 'last'\]"),
        ({"num_samples": 0}, "at least 1 sample"),
    ],
)
def test_bad_configuration_names_the_offending_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VideoDigits(**{"num_samples": 4, **kwargs})


def test_index_out_of_range_names_the_index():
    with pytest.raises(IndexError, match="sample index 4 out of range for 4 samples"):
        VideoDigits(4)[4]
