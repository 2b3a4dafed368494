"""A chat manifest and a folder of media as DHP training data: token counts without decoding, assistant-only
labels, and pixels decoded only by the ranks that encode them.

Token counts come from the processor's own call on pixel tensors of the meta device: the file headers give each
image's size and each video's frame count, rate and size, the processor samples frames, resizes and expands the
placeholders exactly as for real pixels, and no pixel is decoded. Items carry their pixels as
:class:`DeferredPixels`; once a CP group is planned, the family's ``transform_group`` loads on each rank only the
rows of the vision units that rank encodes (a video's temporal patches: only their frames are decoded, and they
are processed at the whole video's size, so the rows equal those of processing the whole video).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_dhp.errors import DHPConfigError, DHPDataError
from lightning_dhp.hf.media import MediaError, VideoInfo, decode_frames, image_size, load_image, video_info
from lightning_dhp.lightning.collate import IGNORE_INDEX

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image", "video")
SUPPORTED_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")
CACHE_VERSION = 1
# records; fewer are counted in this process. A worker costs about 7 s of CPU to start (it imports torch,
# transformers and the caller's main module) and a record 3-4 ms to count (the chat example's 1200 records: 3.3 s
# here, 8.6 s on two workers), so workers pay from a few thousand records
_PARALLEL_FROM = 4096


@dataclass(frozen=True)
class Media:
    """One image or video of a conversation, in order of appearance."""

    kind: str  # "image" or "video"
    path: Path


@dataclass(frozen=True)
class Record:
    """One conversation of the manifest: its messages, the media they name, and its 1-based manifest line."""

    line: int
    messages: list[dict[str, Any]]
    media: tuple[Media, ...]

    def where(self, media: Media | None = None) -> str:
        return f"manifest line {self.line}" + (f" ({media.path})" if media is not None else "")


class BadRecord(Exception):
    """A record that cannot be trained: the message says why; ``path`` names the file at fault, if any."""

    def __init__(self, problem: str, path: Path | None = None) -> None:
        super().__init__(problem)
        self.path = path


def parse_manifest(text: str, json_list: bool, media_root: str | Path) -> tuple[list[Record],
                                                                                 list[tuple[int, str, str]]]:
    """The conversations of a manifest's ``text``, JSONL (one record per line) or, with ``json_list``, a JSON list
    of records, and the bad ones as ``(line, path, problem)``. A record is ``{"messages": [...]}`` or the list of
    messages itself, in the chat-template format (content a string or parts ``{"type": "text" | "image" |
    "video", ...}``); media paths are relative to ``media_root`` unless absolute."""
    entries = enumerate(json.loads(text), start=1) if json_list else \
        ((line, row) for line, row in enumerate(text.splitlines(), start=1) if row.strip())
    records, bad = [], []
    for line, entry in entries:
        try:
            records.append(_record(line, entry if json_list else _json_row(entry), Path(media_root)))
        except BadRecord as problem:
            bad.append((line, str(problem.path or ""), str(problem)))
    return records, bad


def _json_row(row: str) -> Any:
    try:
        return json.loads(row)
    except json.JSONDecodeError as error:
        raise BadRecord(f"not JSON: {error}") from None


def _record(line: int, entry: Any, media_root: Path) -> Record:
    messages = entry.get("messages") if isinstance(entry, dict) else entry
    if not isinstance(messages, list) or not messages:
        raise BadRecord("a record is a non-empty list of messages or {\"messages\": [...]}")
    media = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise BadRecord(f"a message has role {role!r}; the roles are {', '.join(ROLES)}")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRecord(f"a {message['role']} message's content is {type(content).__name__}, not text or a list")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in CONTENT_TYPES:
                raise BadRecord(f"a content part has type {kind!r}; the types are {', '.join(CONTENT_TYPES)}")
            if kind != "text":
                if message["role"] == "assistant":
                    raise BadRecord(f"an assistant message holds an {kind}: only user and system turns may")
                if not isinstance(part.get(kind), str):
                    raise BadRecord(f'an {kind} part needs its path: {{"type": "{kind}", "{kind}": "path"}}')
                media.append(Media(kind, media_root / part[kind]))
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecord("the conversation has no assistant turn, so nothing to learn")
    return Record(line, messages, tuple(media))


class ChatProcessing:
    """Turns a :class:`Record` into the processor's item (picklable: loader and counting workers get a copy).

    ``item(record)`` runs the processor on meta-device pixels (headers read, nothing decoded) and returns the
    item with :class:`DeferredPixels`; ``item(record, decode=True)`` runs it on the decoded media, as plain
    processing does. Labels are the assistant turns' tokens (what each assistant message adds to the rendered
    conversation, including the template's end-of-turn tokens), -100 elsewhere.
    """

    def __init__(self, processor: Any) -> None:
        name = type(processor).__name__
        if name not in SUPPORTED_PROCESSORS:
            raise DHPConfigError(f"ChatDataset counts tokens without decoding for the processors "
                                 f"{', '.join(SUPPORTED_PROCESSORS)}; got {name}. For another model, process the items "
                                 "yourself and pass their lengths to DHPDataModule")
        if not getattr(processor.tokenizer, "is_fast", False):
            raise DHPConfigError("ChatDataset labels the assistant turns from token offsets, which needs a fast "
                                 "tokenizer (AutoProcessor.from_pretrained(..., use_fast=True))")
        self.processor = processor

    def item(self, record: Record, decode: bool = False) -> dict[str, Any]:
        text, spans = self._render(record.messages)
        headers = [self._header(media) for media in record.media]
        images = [_meta_image(header) for header in headers if not isinstance(header, VideoInfo)]
        videos = [header for header in headers if isinstance(header, VideoInfo)]
        output = self._call(text, images, [_meta_video(info) for info in videos], [info.metadata() for info in videos])
        sampled = output.get("video_metadata", [])  # the frames the processor's own sampling chose
        if decode:
            images, frames = [], []
            for media, header in zip(record.media, headers, strict=True):
                if media.kind == "image":
                    images.append(self._read(media, load_image))
                else:
                    indices = _frame_indices(sampled[len(frames)])
                    frames.append((self._read(media, decode_frames, indices), header.metadata(indices)))
            output = self._call(text, images, [video for video, _ in frames], [meta for _, meta in frames],
                                sample=False)
        item = {key: value for key, value in output.items()
                if key not in ("offset_mapping", "text_replacement_offsets", "attention_mask", "video_metadata",
                               "mm_token_type_ids")}
        item["input_ids"] = output["input_ids"][0]
        item["labels"] = _labels(item["input_ids"], output["offset_mapping"][0],
                                 output["text_replacement_offsets"][0], spans)
        if not decode:
            self._defer_pixels(item, record, sampled)
        return item

    @staticmethod
    def _header(media: Media) -> tuple[int, int] | VideoInfo:
        return ChatProcessing._read(media, image_size if media.kind == "image" else video_info)

    @staticmethod
    def _read(media: Media, reader: Any, *args: Any) -> Any:
        try:
            return reader(media.path, *args)
        except MediaError as error:
            raise BadRecord(str(error), media.path) from None

    def _call(self, text: str, images: list, videos: list, metadata: list, sample: bool = True) -> Any:
        options: dict[str, Any] = {"return_offsets_mapping": True, "return_text_replacement_offsets": True,
                                   "return_tensors": "pt"}
        if videos:
            options.update(video_metadata=metadata, return_metadata=True)
            if not sample:
                options["do_sample_frames"] = False
        try:
            output = self.processor(text=[text], images=images or None, videos=videos or None, **options)
        except (ValueError, ZeroDivisionError, RuntimeError) as error:  # e.g. a clip too short to sample
            raise BadRecord(f"the processor refuses it: {error}") from None
        if "text_replacement_offsets" not in output:
            raise DHPConfigError("ChatDataset needs a transformers whose processors return text_replacement_offsets "
                                 "(5.25 does)")
        return output

    def _render(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans each assistant message adds to it."""
        def render(turns: list[dict[str, Any]], prompt: bool = False) -> str:
            try:
                return self.processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
            except Exception as error:  # jinja's errors for turns the template refuses
                raise BadRecord(f"the chat template cannot render it: {error}") from None

        text, spans = render(messages), []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(messages[:turn], prompt=True), render(messages[:turn + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise BadRecord("the chat template does not render earlier turns as a prefix of the whole "
                                "conversation, so the assistant turns cannot be located")
            spans.append((len(before), len(through)))
        return text, spans

    def _defer_pixels(self, item: dict[str, Any], record: Record, sampled: Sequence[Any]) -> None:
        grids = {kind: iter(item.get(f"{kind}_grid_thw", torch.zeros(0, 3, dtype=torch.long)).tolist())
                 for kind in ("image", "video")}
        parts: dict[str, list[MediaPart]] = {"image": [], "video": []}
        for media in record.media:
            frames = _frame_indices(sampled[len(parts["video"])]) if media.kind == "video" else ()
            parts[media.kind].append(MediaPart(media, record.line, tuple(next(grids[media.kind])), tuple(frames)))
        for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if key in item:
                item[key] = DeferredPixels(self, parts[kind], int(item[key].shape[1]))

    def pixels(self, part: MediaPart, ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Rows ``[first, first + count)`` of ``part``'s pixel rows for each range, decoding only what they need
        (a video's frames once for all its ranges)."""
        try:
            if part.media.kind == "image":
                rows = self.processor.image_processor(images=[load_image(part.media.path)],
                                                      return_tensors="pt")["pixel_values"]
                return [rows[first:first + count] for first, count in ranges]
            return self._video_rows(part, ranges)
        except (MediaError, OSError) as error:
            raise DHPDataError(f"{part.media.path} (manifest line {part.line}) became unreadable: {error}") from None

    def _video_rows(self, part: MediaPart, ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Whole temporal patches of a video, their frames decoded alone and processed at the whole video's size:
        the video processor's own resize (to the size its grid says), rescale, normalisation and patch layout."""
        from transformers.image_processing_backends import TorchvisionBackend
        from transformers.image_utils import SizeDict

        processor = self.processor.video_processor
        options = processor._merge_and_standardize_kwargs()
        temporal, patch = options["temporal_patch_size"], options["patch_size"]
        _, height, width = part.grid
        per_step = height * width
        if any(first % per_step or count % per_step for first, count in ranges):
            raise ValueError(f"pixel rows {list(ranges)} are not whole temporal patches of {per_step} rows")
        steps = [step for first, count in ranges for step in range(first // per_step, (first + count) // per_step)]
        indices = [part.frames[min(frame, len(part.frames) - 1)]  # the last patch repeats its last frame
                   for step in steps for frame in range(step * temporal, (step + 1) * temporal)]
        frames = torch.from_numpy(decode_frames(part.media.path, indices)).permute(0, 3, 1, 2).contiguous()[None]
        if options["do_resize"]:
            frames = TorchvisionBackend.resize(processor, image=frames, resample=options["resample"],
                                               size=SizeDict(height=height * patch, width=width * patch))
        frames = processor.rescale_and_normalize(frames, options["do_rescale"], options["rescale_factor"],
                                                 options["do_normalize"], options["image_mean"], options["image_std"])
        rows, *_ = processor.patchify(frames, patch_size=patch, merge_size=options["merge_size"],
                                      temporal_patch_size=temporal)
        return list(rows[0].split([count for _, count in ranges]))


def _meta_image(size: tuple[int, int]) -> torch.Tensor:
    width, height = size
    return torch.empty(3, height, width, dtype=torch.uint8, device="meta")


def _meta_video(info: VideoInfo) -> torch.Tensor:
    return torch.empty(info.total_frames, 3, info.height, info.width, dtype=torch.uint8, device="meta")


def _frame_indices(metadata: Any) -> list[int]:
    """The frames the processor sampled (all of them when it does not sample)."""
    indices = metadata.frames_indices
    return list(range(metadata.total_num_frames)) if indices is None else [int(i) for i in indices]


def _labels(input_ids: torch.Tensor, offsets: torch.Tensor, replacements: list[dict[str, Any]],
            spans: list[tuple[int, int]]) -> torch.Tensor:
    """-100 but for the tokens starting inside an assistant span (spans are in the text before the processor
    expanded its placeholders; ``replacements`` says where it did)."""
    def expanded(position: int) -> int:
        return position + sum(len(r["replacement"]) - (r["span"][1] - r["span"][0])
                              for r in replacements if r["span"][1] <= position)

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for start, end in spans:
        inside = (starts >= expanded(start)) & (starts < expanded(end)) & (ends > starts)
        labels[inside] = input_ids[inside]
    return labels


@dataclass(frozen=True)
class MediaPart:
    """One image or video of a sample's pixel tensor: its grid, and for a video the frames the processor sampled."""

    media: Media
    line: int
    grid: tuple[int, int, int]
    frames: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


class DeferredPixels:
    """Stands for one sample's pixel tensor of one kind (images or videos) before anything is decoded: it has the
    tensor's ``shape``; :meth:`load` decodes and processes the rows a rank encodes."""

    def __init__(self, processing: ChatProcessing, parts: list[MediaPart], width: int) -> None:
        self.processing, self.parts = processing, parts
        self.shape = torch.Size((sum(part.rows for part in parts), width))

    def dim(self) -> int:
        return 2

    def load(self, ranges: Sequence[tuple[int, int]]) -> PixelRows:
        """The rows ``[first, first + count)`` of each range (each within one image or video), each image or
        video decoded once."""
        starts = np.cumsum([0] + [part.rows for part in self.parts])
        by_part: dict[int, list[tuple[int, int]]] = {}
        for first, count in ranges:
            index = int(np.searchsorted(starts, first, side="right")) - 1
            if first + count > starts[index + 1]:
                raise ValueError(f"rows [{first}, {first + count}) cross the end of one image or video")
            by_part.setdefault(index, []).append((first, count))
        blocks = {}
        for index, part_ranges in by_part.items():
            rows = self.processing.pixels(self.parts[index], [(first - starts[index], count)
                                                              for first, count in part_ranges])
            blocks.update({first: block for (first, _), block in zip(part_ranges, rows, strict=True)})
        return PixelRows(blocks, self.shape)


class PixelRows:
    """Some rows of a sample's pixel tensor, by first row: the rows of the vision units this rank encodes.
    Slicing it at a loaded unit gives that unit's rows."""

    def __init__(self, blocks: dict[int, torch.Tensor], shape: torch.Size) -> None:
        self.blocks, self.shape = blocks, shape

    def dim(self) -> int:
        return 2

    def __getitem__(self, rows: slice) -> torch.Tensor:
        block = self.blocks.get(rows.start)
        if block is None or len(block) != rows.stop - rows.start:
            raise KeyError(f"pixel rows [{rows.start}, {rows.stop}) were not loaded on this rank (loaded: "
                           f"{sorted((first, first + len(b)) for first, b in self.blocks.items())})")
        return block


class ChatDataset(Dataset):
    """Conversations of a JSONL/JSON chat manifest with images and videos under ``media_root``, as items of
    ``processor`` (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) with assistant-only ``labels``.

    ``lengths`` and ``vision_patches`` (what ``DHPDataModule`` wants) are counted when the dataset is built,
    from the files' headers and the processor's own rules, without decoding a pixel; in parallel (``num_workers``
    processes, default: the CPUs, for manifests of 4096 records or more) with a progress bar, and cached in
    ``cache_dir`` (default: beside the manifest) keyed by the manifest's content and the processor's settings
    (bad records are counted again on every build, so a fixed file is picked up).
    Records that cannot be trained (a missing or unreadable file, a video without frames, roles or content the
    template does not take, no assistant turn) are listed together, with their manifest lines, in one
    :class:`DHPDataError`; ``skip_bad_samples=True`` drops them and logs how many.

    Items hold their pixels as :class:`DeferredPixels`: under ``DHPDataModule(..., **module.packing_options)``
    each rank decodes only the images and video frames it encodes. :meth:`processed` gives a record as plain
    processing of the decoded media does (for use outside DHP).
    """

    def __init__(self, manifest: str | Path, processor: Any, *, media_root: str | Path | None = None,
                 skip_bad_samples: bool = False, cache_dir: str | Path | None = None, num_workers: int | None = None,
                 progress: bool = True) -> None:
        self.manifest = Path(manifest)
        self.processing = ChatProcessing(processor)
        content = self.manifest.read_bytes()
        records, bad = parse_manifest(content.decode("utf-8"), self.manifest.suffix == ".json",
                                      self.manifest.parent if media_root is None else media_root)
        counts = _cached_counts(self.manifest, cache_key(content, self.processing), records, self.processing,
                                cache_dir, num_workers, progress)
        bad += [(record.line, path, problem) for record, (_, _, path, problem) in zip(records, counts, strict=True)
                if problem is not None]
        if bad and not skip_bad_samples:
            raise DHPDataError(bad_records_table(self.manifest, bad))
        if bad:
            log.warning("ChatDataset: skipped %d bad record(s) of %s (skip_bad_samples=True):\n%s", len(bad),
                        self.manifest, bad_records_table(self.manifest, bad))
        kept = [i for i, count in enumerate(counts) if count[3] is None]
        self.records = [records[i] for i in kept]
        self.lengths = [counts[i][0] for i in kept]
        self.vision_patches = [counts[i][1] for i in kept]
        self.skipped = len(bad)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._item(index, decode=False)

    def processed(self, index: int) -> dict[str, Any]:
        """Record ``index`` as the processor gives it for the decoded media (pixels included), with labels."""
        return self._item(index, decode=True)

    def describe(self, index: int) -> str:
        return self.records[index].where()

    def _item(self, index: int, decode: bool) -> dict[str, Any]:
        record = self.records[index]
        try:
            return self.processing.item(record, decode=decode)
        except BadRecord as bad:
            where = record.where(Media("", bad.path) if bad.path else None)
            raise DHPDataError(f"{where}: {bad} (it was readable when the lengths were counted)") from None


def bad_records_table(manifest: Path, bad: list[tuple[int, str, str]]) -> str:
    rows = "\n".join(f"  line {line:>6}  {path or '-'}  {problem}" for line, path, problem in sorted(bad))
    return (f"{len(bad)} record(s) of {manifest} cannot be trained (fix them, or pass skip_bad_samples=True to "
            f"drop them):\n{rows}")


Count = tuple[int, int, str, str | None]  # tokens, vision patches, path at fault, problem


def count(processing: ChatProcessing, record: Record) -> Count:
    """A record's tokens and vision patches from its files' headers, or the problem that stops it."""
    try:
        item = processing.item(record)
    except BadRecord as bad:
        return 0, 0, str(bad.path or ""), str(bad)
    patches = sum(int(item[key].shape[0]) for key in ("pixel_values", "pixel_values_videos") if key in item)
    if not bool((item["labels"] != IGNORE_INDEX).any()):
        return 0, 0, "", "its assistant turns have no tokens"
    return len(item["input_ids"]), patches, "", None


_WORKER_PROCESSING: ChatProcessing | None = None


def _start_worker(processing: ChatProcessing) -> None:
    global _WORKER_PROCESSING
    _WORKER_PROCESSING = processing
    torch.set_num_threads(1)


def _count_chunk(records: list[Record]) -> list[Count]:
    assert _WORKER_PROCESSING is not None
    return [count(_WORKER_PROCESSING, record) for record in records]


def count_all(processing: ChatProcessing, records: list[Record], num_workers: int | None = None,
              progress: bool = True) -> list[Count]:
    """:func:`count` of every record, in worker processes for large manifests, with a progress bar."""
    from tqdm.auto import tqdm

    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    bar = tqdm(total=len(records), desc="counting tokens", unit="record", disable=not progress)
    try:
        if workers <= 1 or len(records) < _PARALLEL_FROM:
            counts = []
            for record in records:
                counts.append(count(processing, record))
                bar.update()
            return counts
        chunk = max(16, min(256, len(records) // (8 * workers)))
        chunks = [records[i:i + chunk] for i in range(0, len(records), chunk)]
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        with concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context(method),
                                                    initializer=_start_worker, initargs=(processing,)) as pool:
            counts = []
            for result in pool.map(_count_chunk, chunks):
                counts.extend(result)
                bar.update(len(result))
            return counts
    finally:
        bar.close()


def cache_key(manifest_content: bytes, processing: ChatProcessing) -> str:
    """Hash of the manifest's bytes, the processor's settings, its tokenizer and chat template."""
    processor = processing.processor
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}\0{type(processor).__name__}\0".encode())
    digest.update(manifest_content)
    for settings in (processor.image_processor.to_json_string(), processor.video_processor.to_json_string(),
                     processor.tokenizer.backend_tokenizer.to_str(), str(processor.chat_template)):
        digest.update(b"\0" + settings.encode())
    return digest.hexdigest()


def _cached_counts(manifest: Path, key: str, records: list[Record], processing: ChatProcessing,
                   cache_dir: str | Path | None, num_workers: int | None, progress: bool) -> list[Count]:
    """Every record's :data:`Count`, from the cache (file named by ``key``) where it holds them; bad records are
    counted again (their files may have been fixed since), and the cache is rewritten when anything was counted."""
    directory = manifest.parent if cache_dir is None else Path(cache_dir)
    path = directory / f"{manifest.name}.dhp-counts-{key[:16]}.json"
    counts: list[Count | None] = [None] * len(records)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key and len(cached["counts"]) == len(records):
            counts = [tuple(entry) if entry[3] is None else None for entry in cached["counts"]]
    missing = [i for i, entry in enumerate(counts) if entry is None]
    if not missing:
        return counts
    for i, entry in zip(missing, count_all(processing, [records[i] for i in missing], num_workers, progress),
                        strict=True):
        counts[i] = entry
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"key": key, "counts": counts}))
        temporary.replace(path)  # atomic: ranks building the dataset at once never read half a file
    except OSError as error:
        log.warning("ChatDataset: could not cache the token counts in %s (%s); pass cache_dir=...", directory, error)
    return counts
