"""ChatDataset: token counts from file headers equal what processing the decoded media gives, the pixel rows each
rank decodes equal the rows of processing the whole video, bad records are listed together, counts are cached,
and DHP training on deferred pixels equals single-device training on fully processed items (float64, 1-3
processes)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dhp import DHPDataModule, DHPPlanReport, DHPStrategy, ZigzagLayout
from lightning_dhp.errors import DHPConfigError, DHPDataError, PlanError
from lightning_dhp.hf import ChatDataset, HFModule
from lightning_dhp.hf import chat as chat_module
from lightning_dhp.hf.chat_digits import tiny_model, tiny_processor, write_chat_digits, write_video
from lightning_dhp.hf.families import family_of
from lightning_dhp.hf.media import decode_frames, video_info
from lightning_dhp.hf.vision import _owners, group_units
from lightning_dhp.lightning import DHPPacking
from lightning_dhp.lightning.planned_loader import PlanConfig, PlannedDataset, StepRequest, check_largest_samples_fit
from lightning_dhp.testing import run_distributed
from tests.helpers import (
    STEPS,
    as_torchrun_rank,
    assert_parameters_match,
    cpu_trainer,
    error_of,
    same_error_on_every_rank,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# (frames, fps, height, width): one frame to long clips, odd rates, tiny and oversized frames, odd aspect ratios
VIDEOS = [(2, 5, 16, 16), (3, 24, 32, 48), (7, 30, 64, 32), (25, 12, 40, 96), (48, 30, 96, 64), (90, 25, 24, 160),
          (13, 8, 128, 128), (60, 60, 16, 40)]
IMAGES = [(16, 16), (9, 200), (300, 200), (37, 53), (48, 48), (120, 8)]


def _conversation(*parts: dict, answer: str = "7", system: bool = False) -> dict:
    messages = [{"role": "system", "content": "Answer with one digit."}] if system else []
    messages += [{"role": "user", "content": [*parts, {"type": "text", "text": "Which digit?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"messages": messages}


def _write(directory: Path, records: list) -> Path:
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in records))
    return manifest


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Videos and images of many sizes, rates and durations, and a manifest mixing them (multi-turn, several
    media per conversation, a system turn)."""
    directory = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for index, (frames, fps, height, width) in enumerate(VIDEOS):
        write_video(directory / f"v{index}.mp4", [rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
                                                  for _ in range(frames)], fps, gop_size=5)
    for index, (height, width) in enumerate(IMAGES):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(directory / f"i{index}.png")
    records = [_conversation({"type": "video", "video": f"v{i}.mp4"}, answer=str(i)) for i in range(len(VIDEOS))]
    records += [_conversation({"type": "image", "image": f"i{i}.png"}, system=i % 2 == 0) for i in range(len(IMAGES))]
    records.append(_conversation({"type": "image", "image": "i0.png"}, {"type": "video", "video": "v3.mp4"},
                                 {"type": "image", "image": "i3.png"}, answer="two turns"))
    records[-1]["messages"] += [{"role": "user", "content": [{"type": "video", "video": "v1.mp4"}]},
                                {"role": "assistant", "content": "and a second answer"}]
    _write(directory, records)
    return directory


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_from_headers_equal_processing_the_decoded_media(media, family, tmp_path):
    processor = tiny_processor(family)
    dataset = ChatDataset(media / "manifest.jsonl", processor, cache_dir=tmp_path, progress=False)
    assert len(dataset) == len(VIDEOS) + len(IMAGES) + 1
    for index in range(len(dataset)):
        deferred, processed = dataset[index], dataset.processed(index)
        assert dataset.lengths[index] == len(processed["input_ids"]), dataset.describe(index)
        torch.testing.assert_close(deferred["input_ids"], processed["input_ids"], rtol=0, atol=0)
        torch.testing.assert_close(deferred["labels"], processed["labels"], rtol=0, atol=0)
        pixel_keys = [key for key in ("pixel_values", "pixel_values_videos") if key in processed]
        assert dataset.vision_patches[index] == sum(len(processed[key]) for key in pixel_keys)
        for key in processed:
            if key.endswith("grid_thw") or key == "second_per_grid_ts":
                torch.testing.assert_close(deferred[key], processed[key], rtol=0, atol=0)
        for key in pixel_keys:
            assert deferred[key].shape == processed[key].shape

def test_a_written_clip_decodes_to_the_same_pixels_every_time(tmp_path):
    """The example's clips are reproducible (training on them too): lossy x264 encodes of the same frames differed
    from run to run, about one clip in five."""
    rng = np.random.default_rng(0)
    clips = [[rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(9)]
             for height, width in [(32, 40), (48, 48), (40, 32), (48, 32)] * 3]
    for index, frames in enumerate(clips):
        decoded = []
        for attempt in range(3):
            write_video(tmp_path / f"{index}_{attempt}.mp4", frames, fps=4, gop_size=4)
            decoded.append(decode_frames(tmp_path / f"{index}_{attempt}.mp4", list(range(len(frames)))))
        assert all(np.array_equal(decoded[0], other) for other in decoded[1:]), index



@pytest.mark.parametrize("family", FAMILIES)
def test_processing_equals_the_processors_own_sampling_of_transformers_pyav_frames(media, family, tmp_path):
    """The oracle: transformers decodes every frame with its PyAV reader and samples them itself."""
    from transformers.video_utils import read_video_pyav

    processor = tiny_processor(family)
    dataset = ChatDataset(media / "manifest.jsonl", processor, cache_dir=tmp_path, progress=False)
    for index in range(len(VIDEOS)):
        frames, metadata = read_video_pyav(str(media / f"v{index}.mp4"),
                                           sample_indices_fn=lambda metadata, **kwargs: np.arange(
                                               metadata.total_num_frames))
        metadata.frames_indices = None
        text = processor.apply_chat_template(dataset.records[index].messages, tokenize=False)
        own = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt")
        processed = dataset.processed(index)
        torch.testing.assert_close(processed["input_ids"], own["input_ids"][0], rtol=0, atol=0)
        torch.testing.assert_close(processed["pixel_values_videos"], own["pixel_values_videos"], rtol=0, atol=0)


def test_labels_are_the_assistant_turns_whatever_the_template(media, tmp_path):
    processor = tiny_processor("qwen2_5_vl")
    dataset = ChatDataset(media / "manifest.jsonl", processor, cache_dir=tmp_path, progress=False)
    labelled = processor.tokenizer.decode(dataset[len(dataset) - 1]["labels"].clamp(min=0)[
        dataset[len(dataset) - 1]["labels"] != -100])
    assert labelled == "two turns<|im_end|>\nand a second answer<|im_end|>\n"
    for index in range(len(VIDEOS)):
        item = dataset[index]
        assert processor.tokenizer.decode(item["input_ids"][item["labels"] != -100]) == f"{index}<|im_end|>\n"


def test_decoded_frames_equal_transformers_pyav_reader_for_any_subset(media):
    from transformers.video_utils import read_video_pyav

    path = str(media / "v5.mp4")  # 90 frames, a keyframe every 5
    everything, _ = read_video_pyav(path, sample_indices_fn=lambda metadata, **kwargs: np.arange(90))
    for indices in ([0], [89], [3, 4, 5, 6], [10, 50, 51, 88], list(range(0, 90, 7)), [44, 12]):
        np.testing.assert_array_equal(decode_frames(path, indices), everything[indices])
    assert video_info(path).total_frames == 90


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_each_rank_decodes_only_its_units_and_their_rows_equal_processing_the_whole_video(media, degree, tmp_path):
    processor = tiny_processor("qwen3_vl")
    dataset = ChatDataset(media / "manifest.jsonl", processor, cache_dir=tmp_path, progress=False)
    family = family_of(tiny_model("qwen3_vl"))
    indices = [3, 4, 5, len(dataset) - 1, len(VIDEOS) + 2]  # long videos, a multi-media record, an image
    items = [family(dataset[i]) for i in indices]
    processed = [dataset.processed(i) for i in indices]
    layout = ZigzagLayout([len(item["input_ids"]) for item in items], degree, 0)
    batch = DHPPacking(family.token_fields).collate_group(items, layout)  # items already transformed
    units = group_units(family, batch, layout)
    owners = _owners(units, degree)
    assert len({unit.kind for unit in units}) == 2 and max(owners) == degree - 1
    loaded = 0
    for rank in range(degree):
        rank_layout = ZigzagLayout(layout.seq_lens, degree, rank)
        rank_batch = family.transform_group({**batch, **{key: list(batch[key]) for key in family.pixel_keys.values()}},
                                            rank_layout)
        for unit, owner in zip(units, owners, strict=True):
            rows = rank_batch[family.pixel_keys[unit.kind]][unit.sample]
            expected = processed[unit.sample][family.pixel_keys[unit.kind]][unit.first_pixel:
                                                                             unit.first_pixel + unit.pixels]
            if owner == rank:
                torch.testing.assert_close(rows[unit.first_pixel:unit.first_pixel + unit.pixels], expected,
                                           rtol=0, atol=0)
                loaded += unit.pixels
            elif rows is not None:
                with pytest.raises(KeyError, match="not loaded on this rank"):
                    rows[unit.first_pixel:unit.first_pixel + unit.pixels]
    assert loaded == sum(unit.pixels for unit in units)  # every unit loaded once, by its owner


def test_bad_records_are_listed_together_with_their_lines_and_can_be_skipped(media, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    write_video(tmp_path / "one_frame.mp4", [np.zeros((16, 16, 3), dtype=np.uint8)], fps=5)
    shutil.copy(media / "v1.mp4", tmp_path / "v1.mp4")
    records = [
        _conversation({"type": "video", "video": "v1.mp4"}),                                  # line 1: good
        _conversation({"type": "image", "image": "missing.png"}),                             # line 2
        _conversation({"type": "image", "image": "broken.png"}),                              # line 3
        _conversation({"type": "video", "video": "broken.mp4"}),                              # line 4
        {"messages": [{"role": "narrator", "content": "once upon a time"}]},                  # line 5
        _conversation({"type": "audio", "audio": "a.wav"}),                                   # line 6
        {"messages": [{"role": "user", "content": "a question nobody answers"}]},             # line 7
        "{not json",                                                                          # line 8
        _conversation({"type": "video", "video": "v1.mp4"}, answer="4"),                      # line 9: good
        _conversation({"type": "video", "video": "one_frame.mp4"}),                           # line 10
    ]
    manifest = _write(tmp_path, records)
    processor = tiny_processor("qwen3_vl")
    with pytest.raises(DHPDataError) as raised:
        ChatDataset(manifest, processor, progress=False)
    message = str(raised.value)
    assert "8 record(s)" in message
    for line, problem in ((2, "missing.png"), (3, "broken.png"), (4, "broken.mp4"), (5, "'narrator'"),
                          (6, "'audio'"), (7, "no assistant turn"), (8, "not JSON"),
                          (10, "the processor refuses it")):
        assert any(f"line {line:>6}" in row and problem in row for row in message.splitlines()), (line, message)
    dataset = ChatDataset(manifest, processor, skip_bad_samples=True, progress=False)
    assert len(dataset) == 2 and dataset.skipped == 8
    assert [record.line for record in dataset.records] == [1, 9]
    shutil.copy(media / "i0.png", tmp_path / "missing.png")  # fixed after counting: counted again, not cached bad
    assert [record.line for record in ChatDataset(manifest, processor, skip_bad_samples=True,
                                                  progress=False).records] == [1, 2, 9]


def test_counts_are_cached_by_manifest_and_processor_settings(media, tmp_path, monkeypatch):
    shutil.copytree(media, tmp_path / "data")
    manifest = tmp_path / "data" / "manifest.jsonl"
    first = ChatDataset(manifest, tiny_processor("qwen3_vl"), progress=False)
    assert len(list(manifest.parent.glob("manifest.jsonl.dhp-counts-*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("counted again although the cache holds the counts")

    monkeypatch.setattr(chat_module, "count_all", refuse)
    again = ChatDataset(manifest, tiny_processor("qwen3_vl"), progress=False)
    assert again.lengths == first.lengths and again.vision_patches == first.vision_patches
    monkeypatch.undo()
    slower = ChatDataset(manifest, tiny_processor("qwen3_vl", fps=1.0), progress=False)  # other settings: recount
    assert slower.lengths != first.lengths
    assert len(list(manifest.parent.glob("manifest.jsonl.dhp-counts-*.json"))) == 2


def test_counting_in_worker_processes_gives_the_same_counts(media, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_module, "_PARALLEL_FROM", 1)
    processor = tiny_processor("qwen2_5_vl")
    parallel = ChatDataset(media / "manifest.jsonl", processor, cache_dir=tmp_path / "a", num_workers=2,
                           progress=False)
    serial = ChatDataset(media / "manifest.jsonl", processor, cache_dir=tmp_path / "b", num_workers=1,
                         progress=False)
    assert parallel.lengths == serial.lengths and parallel.vision_patches == serial.vision_patches


def test_a_file_that_becomes_unreadable_is_a_data_error_naming_its_manifest_line(media, tmp_path):
    shutil.copytree(media, tmp_path / "data")
    processor = tiny_processor("qwen3_vl")
    dataset = ChatDataset(tmp_path / "data" / "manifest.jsonl", processor, progress=False)
    item = dataset[4]
    per_patch = int(item["video_grid_thw"][0, 1:].prod())
    (tmp_path / "data" / "v4.mp4").unlink()
    with pytest.raises(DHPDataError, match=r"manifest line 5 .*v4\.mp4.*no such file"):
        dataset[4]
    with pytest.raises(DHPDataError, match=r"v4\.mp4 \(manifest line 5\) became unreadable"):
        item["pixel_values_videos"].load([(0, per_patch)])
    # in the loader, gone between loading the item and decoding its frames: the step carries the error (the
    # strategy raises it on every rank)
    shutil.copy(media / "v4.mp4", tmp_path / "data" / "v4.mp4")
    family = family_of(tiny_model("qwen3_vl"))
    planned = PlannedDataset(VanishingMedia(dataset, 4, tmp_path / "data" / "v4.mp4"), dataset.lengths,
                             PlanConfig(num_devices=1, rank=0, tokens_per_device=4096),
                             DHPPacking(family.token_fields, family), dataset.vision_patches)
    step = planned[StepRequest("loader", 0, 0, (3, 4))]
    assert step.error is not None and "v4.mp4 (manifest line 5) became unreadable" in step.error, step.error


class VanishingMedia(torch.utils.data.Dataset):
    """``dataset``, whose item ``index`` deletes ``path`` once loaded (before the loader decodes its frames)."""

    def __init__(self, dataset: ChatDataset, index: int, path: Path) -> None:
        self.dataset, self.index, self.path = dataset, index, path

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if index == self.index:
            self.path.unlink()
        return item


def test_processors_without_header_counting_are_refused_naming_the_supported_ones():
    from transformers import LlavaOnevisionProcessor

    with pytest.raises(DHPConfigError, match="Qwen2_5_VLProcessor"):
        ChatDataset("unused.jsonl", LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor))


# DHP training on deferred pixels against training on fully processed items, in one 2-process world


def _adamw(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-2)


class Processed(torch.utils.data.Dataset):
    """The same records, processed whole (every pixel decoded in ``__getitem__``)."""

    def __init__(self, dataset: ChatDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset.processed(index)


def _fit(world_size: int, dataset, lengths, patches, tokens_per_device: int, steps: int = STEPS,
         **strategy_options) -> dict:
    module = HFModule(tiny_model("qwen3_vl", seed=1).double(), optimizer=_adamw)
    data = DHPDataModule(dataset, lengths, 4, vision_patches=patches, seed=0, **module.packing_options)
    with tempfile.TemporaryDirectory() as report_dir:
        plans = DHPPlanReport(dirpath=report_dir, num_plotted_steps=0, log_metrics=False)
        cpu_trainer(world_size, DHPStrategy(tokens_per_device=tokens_per_device, **strategy_options), steps,
                 callbacks=[plans]).fit(module, datamodule=data)
    degrees = {group.degree for entry in plans.history for r in entry["plan"].rounds for group in r.groups}
    return {"params": {name: value.detach().clone() for name, value in module.model.state_dict().items()},
            "degrees": degrees}


# The largest world runs last and deletes a clip, to check media gone during training.
WORLD_SIZES = (1, 2, 3)
TOKENS_PER_DEVICE = {1: 512, 2: 96, 3: 96}  # one process holds every record; more need CP for the long clips


def _chat_scenarios(rank: int, world_size: int, manifest: str) -> dict:
    as_torchrun_rank(rank)
    dataset = ChatDataset(manifest, tiny_processor("qwen3_vl"), progress=False)
    lengths, patches, tokens = dataset.lengths, dataset.vision_patches, TOKENS_PER_DEVICE[world_size]
    reports = {"deferred": _fit(world_size, dataset, lengths, patches, tokens),
               "processed": _fit(world_size, Processed(dataset), lengths, patches, tokens)}
    if world_size == max(WORLD_SIZES):
        (Path(manifest).parent / "media" / "video_00002.mp4").unlink(missing_ok=True)  # gone after counting
        epoch = len(dataset) // 4  # steps
        reports["unreadable"] = error_of(lambda: _fit(world_size, dataset, lengths, patches, tokens, steps=epoch))
        reports["unreadable_skipped"] = error_of(lambda: _fit(world_size, dataset, lengths, patches, tokens,
                                                              steps=epoch, skip_bad_samples=True))
    return reports


@pytest.fixture(scope="module")
def chat_worlds(tmp_path_factory) -> dict[int, list[dict]]:
    manifest = write_chat_digits(tmp_path_factory.mktemp("chat"), num_videos=8, num_images=8, seed=3,
                                 frame_sizes=(32, 48), durations_s=(1.0, 3.0))
    ChatDataset(manifest, tiny_processor("qwen3_vl"), progress=False)  # counted once, here; the ranks read the cache
    return {size: run_distributed(_chat_scenarios, size, str(manifest), timeout_s=280) for size in WORLD_SIZES}


def test_dhp_training_on_deferred_pixels_equals_single_device_training_on_processed_items(chat_worlds):
    """At 1, 2 and 3 processes, deferred pixels train exactly as fully processed items do, and both as one process
    (single-device training on the same global batches) on processed items, in float64."""
    single_device = chat_worlds[1][0]["processed"]["params"]
    for size, reports in chat_worlds.items():
        for report in reports:
            deferred, processed = report["deferred"]["params"], report["processed"]["params"]
            assert deferred.keys() == processed.keys() == single_device.keys()
            assert_parameters_match(deferred, processed)
            assert_parameters_match(deferred, single_device)
            degrees = report["deferred"]["degrees"]
            assert (degrees == {1}) if size == 1 else ({1, 2} <= degrees <= set(range(1, size + 1))), degrees
    initial = tiny_model("qwen3_vl", seed=1).double().state_dict()
    assert not torch.equal(single_device["model.visual.patch_embed.proj.weight"],
                           initial["model.visual.patch_embed.proj.weight"]), "the vision tower must train"


def test_media_gone_during_training_is_the_same_data_error_on_every_rank_or_skipped(chat_worlds):
    world = chat_worlds[max(WORLD_SIZES)]
    kind, message = same_error_on_every_rank(world, "unreadable")
    assert kind == "DHPDataError" and "video_00002.mp4" in message and "manifest line 3" in message, message
    assert same_error_on_every_rank(world, "unreadable_skipped") == ("ok", "")


def test_a_conversation_longer_than_the_cluster_holds_is_named_by_its_manifest_line(media, tmp_path):
    dataset = ChatDataset(media / "manifest.jsonl", tiny_processor("qwen3_vl"), cache_dir=tmp_path, progress=False)
    longest = max(range(len(dataset)), key=lambda i: dataset.lengths[i])
    with pytest.raises(PlanError, match=f"dataset sample {longest} \\(manifest line {longest + 1}\\) cannot be"):
        check_largest_samples_fit(dataset.lengths, None, PlanConfig(num_devices=2, rank=0, tokens_per_device=16),
                                  dataset.describe)
