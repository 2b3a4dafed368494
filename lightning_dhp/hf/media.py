"""Image and video files: what their headers say (no pixel decoded), and the frames one asks for.

Videos are read with PyAV, whose wheels carry their own FFmpeg, so a bare machine decodes them (torchcodec
needs FFmpeg's shared libraries installed beside it). Frame ``i`` is the ``i``-th frame in presentation order,
as transformers' own PyAV reader counts them, so a processor given these frames sees the same pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A seek restarts decoding at a keyframe: worth it when it skips more frames than this (a seek and the frames
# from the keyframe cost about as much as decoding a few frames through, on the generated H.264 clips).
SEEK_FRAMES = 8


class MediaError(Exception):
    """A media file that cannot be read; the message says what is wrong with it."""


@dataclass(frozen=True)
class VideoInfo:
    """A video stream's header: frame count, frame rate and frame size."""

    total_frames: int
    fps: float
    width: int
    height: int

    def metadata(self, frames_indices: Sequence[int] | None = None):  # -> transformers.video_utils.VideoMetadata
        """transformers' ``VideoMetadata``, filled as its PyAV reader fills it."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(total_num_frames=self.total_frames, fps=self.fps, width=self.width, height=self.height,
                             duration=self.total_frames / self.fps, video_backend="pyav",
                             frames_indices=None if frames_indices is None else list(frames_indices))


def _exists(path: str | Path) -> None:
    if not Path(path).is_file():
        raise MediaError("no such file")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the image file's header."""
    from PIL import Image, UnidentifiedImageError

    _exists(path)
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as error:
        raise MediaError(f"cannot read the image: {error}") from None


def load_image(path: str | Path):  # -> PIL.Image.Image
    """The decoded image, in RGB (what a Qwen-VL processor converts any image to)."""
    from PIL import Image

    _exists(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise MediaError(f"cannot decode the image: {error}") from None


def _open(path: str | Path):  # -> av.container.InputContainer
    import av

    _exists(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as error:
        raise MediaError(f"cannot open the video: {error}") from None
    if not container.streams.video:
        container.close()
        raise MediaError("the file has no video stream")
    return container


def video_info(path: str | Path) -> VideoInfo:
    """The first video stream's header; frames are counted from the packets (no decoding) when the container
    does not state their number."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError as error:
            raise MediaError(f"cannot read the video's packets: {error}") from None
        if not total:
            raise MediaError("the video has no frames")
        if not stream.average_rate:
            raise MediaError("the video states no frame rate")
        return VideoInfo(int(total), float(stream.average_rate), stream.width, stream.height)


def decode_frames(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Frames ``indices`` (presentation order) as ``(len(indices), height, width, 3)`` uint8 RGB.

    Decodes from the keyframe before each run of wanted frames, skipping the stretches between keyframes that
    hold none, so a rank asking for a part of a long video pays for about that part.
    """
    import av

    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("decode_frames needs at least one frame index")
    frames: dict[int, np.ndarray] = {}
    status = Path(path).stat()
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            table = _timestamps(str(path), status.st_mtime_ns, status.st_size)
            if table is None:  # no timestamps to seek by: decode from the start
                _decode_run(container, stream, wanted, None, frames)
            else:
                order, index_of, keyframes = table
                for run in _runs(wanted, keyframes):
                    _decode_run(container, stream, run, (order[run[0]], index_of), frames)
        except av.FFmpegError as error:
            raise MediaError(f"cannot decode the video: {error}") from None
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise MediaError(f"the video has no decodable frame {missing[0]} ({len(missing)} of {len(wanted)} wanted "
                         "frames missing)")
    return np.stack([frames[int(i)] for i in indices])


@functools.lru_cache(maxsize=256)
def _timestamps(path: str, modified_ns: int, size: int) -> tuple[list[int], dict[int, int], list[int]] | None:
    """The video stream's presentation timestamps in order, each one's frame index, and the keyframes' frame
    indices, from its packets (no decoding; cached per file version); None if some packet has no timestamp."""
    with _open(path) as container:
        stream = container.streams.video[0]
        packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.size]
    if any(pts is None for pts, _ in packets):
        return None
    order = sorted(pts for pts, _ in packets)
    index_of = {pts: index for index, pts in enumerate(order)}
    return order, index_of, sorted(index_of[pts] for pts, key in packets if key)


def _runs(wanted: list[int], keyframes: list[int]) -> list[list[int]]:
    """``wanted`` cut where a seek saves work: where a keyframe lies more than ``SEEK_FRAMES`` after one wanted
    frame and at or before the next. Each run is decoded from the keyframe before its first frame."""
    runs = [[wanted[0]]]
    for index in wanted[1:]:
        position = int(np.searchsorted(keyframes, index, side="right")) - 1
        if position >= 0 and keyframes[position] > runs[-1][-1] + SEEK_FRAMES:
            runs.append([])
        runs[-1].append(index)
    return runs


def _decode_run(container, stream, run: list[int], timestamps: tuple[int, dict[int, int]] | None,
                frames: dict[int, np.ndarray]) -> None:
    """Decode the frames of ``run``: from the keyframe at or before its first, given ``timestamps`` (the first
    frame's and each timestamp's frame index), else from the start, counting frames."""
    index_of = None
    if timestamps is None:
        container.seek(0)
    else:
        first, index_of = timestamps
        container.seek(first, stream=stream, backward=True, any_frame=False)
    wanted = set(run)
    for count, frame in enumerate(container.decode(stream)):
        index = count if index_of is None else index_of.get(frame.pts, -1)
        if index in wanted:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index >= run[-1]:
            return
