"""Video digits: a synthetic multimodal task with real (ActivityNet) video lengths.

Each sample is a "video": frames showing one rendered digit each (as large as the frame allows,
random colours, a pixel of jitter, Gaussian noise) at a per-sample resolution, followed by a question
whose one-token answer must be read from the frames:

- ``most``: which digit appears in most frames (the answer fills ``majority_fraction`` of the frames,
  at least one more than any other digit);
- ``last``: which digit the last frame shows (frame digits are uniform, so counting does not help).

Sequence: ``<bos> video : <visual tokens of every frame> which digit appears most ? <answer>`` (or
``which digit is last ?``); only the answer token is labelled, so chance accuracy is 1/10.

Length rule (stated wherever a figure is reported): a sample draws an ActivityNet v1.3 duration;
``frames = min(max_frames, max(1, floor(duration_s * sample_fps)))``; each frame is H x W pixels with
H, W drawn from ``frame_sizes``, giving ``(H / patch_size) * (W / patch_size)`` visual tokens per
frame; plus 9 text tokens. At the defaults (0.25 fps, at most 128 frames, 16-32 px, 8 px patches)
lengths run from 13 to about 2000 tokens: p10 ~57, p50 ~225, p90 ~550, p99 ~860.

``VideoDigits.single_image`` is the short pretraining variant of the same task: one frame per sample.
Everything is deterministic per ``seed``; ``lengths`` is known without rendering any pixel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_dhp.data.lengths import read_metadata, video_tokens

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")
DIGIT_TOKENS = tuple(str(digit) for digit in range(10))
WORDS = ("video", "image", ":", "which", "digit", "appears", "most", "is", "last", "?")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + DIGIT_TOKENS + WORDS
TOKEN_IDS: dict[str, int] = {token: index for index, token in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = (TOKEN_IDS[token] for token in SPECIAL_TOKENS)
DIGIT_IDS: tuple[int, ...] = tuple(TOKEN_IDS[token] for token in DIGIT_TOKENS)

QUESTIONS: dict[str, tuple[str, ...]] = {
    "most": ("which", "digit", "appears", "most", "?"),
    "last": ("which", "digit", "is", "last", "?"),
}
TEXT_TOKENS_PER_SAMPLE = 3 + 5 + 1  # "<bos> video :" + question + answer

# 5 x 7 bitmap glyphs of the digits 0-9.
_GLYPH_ROWS = (
    ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
)
GLYPHS = np.array([[[pixel == "1" for pixel in row] for row in glyph] for glyph in _GLYPH_ROWS])
GLYPH_HEIGHT, GLYPH_WIDTH = GLYPHS.shape[1:]

ACTIVITYNET_FILE = "activitynet_v13_videos.csv"


def decode(token_ids: Sequence[int] | torch.Tensor) -> str:
    """Readable text of ``token_ids`` (visual tokens shown as ``<image>``)."""
    return " ".join(VOCAB[int(token)] for token in token_ids)


def render_frame(
    digit: int, height: int, width: int, noise_std: float, jitter: int, rng: np.random.Generator
) -> np.ndarray:
    """A (3, height, width) float32 frame: ``digit`` as large as fits, near the centre (offset by up to
    ``jitter`` px), in random light-on-dark colours, plus Gaussian noise."""
    scale = min(height // GLYPH_HEIGHT, width // GLYPH_WIDTH)
    glyph = GLYPHS[digit].repeat(scale, axis=0).repeat(scale, axis=1)
    top, left = (np.array([height, width]) - glyph.shape) // 2 + rng.integers(-jitter, jitter + 1, size=2)
    top = int(np.clip(top, 0, height - glyph.shape[0]))
    left = int(np.clip(left, 0, width - glyph.shape[1]))
    background = rng.uniform(0.0, 0.25, size=(3, 1, 1))
    ink = rng.uniform(0.75, 1.0, size=(3, 1, 1))
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + glyph.shape[0], left : left + glyph.shape[1]] = glyph
    frame = np.where(mask, ink, background) + rng.normal(0.0, noise_std, size=(3, height, width))
    return (frame - 0.5).astype(np.float32)


def majority_digits(answer: int, num_frames: int, majority_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Digits of ``num_frames`` frames in which ``answer`` appears strictly more often than any other."""
    answer_count = max(1, int(np.ceil(majority_fraction * num_frames)))
    others = (answer + rng.integers(1, 10, size=num_frames - answer_count)) % 10
    while len(others) and np.bincount(others, minlength=10).max() >= answer_count:
        others = others[1:]
        answer_count += 1
    digits = np.concatenate([np.full(answer_count, answer), others])
    return rng.permutation(digits)


class VideoDigits(Dataset):
    """Deterministic synthetic video question answering with long-tailed, real sequence lengths.

    ``durations_s`` overrides the ActivityNet durations (e.g. in tests); ``num_frames`` fixes the
    frame count of every sample instead (``single_image`` uses 1). ``metadata_file`` is a path or a
    file name in ``data_dir`` (default: see :func:`lightning_dhp.data.lengths.shared_data_dir`).
    ``visual_index`` is per-token (``token_fields``); ``pixel_values``, ``answer`` and ``question``
    are per-sample. ``lengths`` and ``vision_patches`` come from the metadata, without rendering a frame.
    """

    token_fields = ("visual_index",)

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        sample_fps: float = 0.25,
        max_frames: int | None = 128,
        frame_sizes: Sequence[int] = (16, 24, 32),
        patch_size: int = 8,
        noise_std: float = 0.1,
        jitter: int = 1,
        majority_fraction: float = 0.6,
        questions: Sequence[str] = ("most", "last"),
        durations_s: Sequence[float] | np.ndarray | None = None,
        num_frames: int | None = None,
        metadata_file: str = ACTIVITYNET_FILE,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples is {num_samples}; a dataset needs at least 1 sample")
        bad_sizes = [size for size in frame_sizes if size % patch_size or size < max(GLYPH_HEIGHT, patch_size)]
        if bad_sizes:
            raise ValueError(
                f"frame_sizes {bad_sizes} are not multiples of patch_size={patch_size} of at "
                f"least {max(GLYPH_HEIGHT, patch_size)} px; pick sizes like {4 * patch_size}"
            )
        unknown = [question for question in questions if question not in QUESTIONS]
        if unknown or not questions:
            raise ValueError(f"questions {list(questions)} must be a non-empty subset of {list(QUESTIONS)}")
        self.seed = seed
        self.patch_size = patch_size
        self.noise_std = noise_std
        self.jitter = jitter
        self.majority_fraction = majority_fraction
        self.video = num_frames != 1

        rng = np.random.default_rng([seed, num_samples])
        if num_frames is not None:
            self.num_frames = np.full(num_samples, num_frames, dtype=np.int64)
        else:
            if durations_s is None:
                durations_s = read_metadata(metadata_file, ["duration_s"], data_dir=data_dir)["duration_s"]
            durations = rng.choice(np.asarray(durations_s, dtype=np.float64), size=num_samples)
            self.num_frames = video_tokens(
                durations, 0, sample_fps=sample_fps, tokens_per_frame=1, max_frames=max_frames
            )
        self.frame_heights = rng.choice(np.asarray(frame_sizes), size=num_samples)
        self.frame_widths = rng.choice(np.asarray(frame_sizes), size=num_samples)
        self.question_kinds = rng.choice(np.asarray(questions), size=num_samples)
        self.tokens_per_frame = (self.frame_heights // patch_size) * (self.frame_widths // patch_size)
        self.vision_patches: np.ndarray = self.num_frames * self.tokens_per_frame  # one visual token per patch
        self.lengths: np.ndarray = self.vision_patches + TEXT_TOKENS_PER_SAMPLE

    @classmethod
    def single_image(cls, num_samples: int, *, seed: int = 0, **kwargs: Any) -> VideoDigits:
        """The pretraining variant: one frame per sample, same questions and vocabulary."""
        return cls(num_samples, seed=seed, num_frames=1, **kwargs)

    def __len__(self) -> int:
        return len(self.lengths)

    def frame_digits(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The digit of every frame of sample ``index`` and the answer."""
        num_frames = int(self.num_frames[index])
        if self.question_kinds[index] == "last":
            digits = rng.integers(0, 10, size=num_frames)
            return digits, int(digits[-1])
        answer = int(rng.integers(0, 10))
        return majority_digits(answer, num_frames, self.majority_fraction, rng), answer

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        rng = np.random.default_rng([self.seed, index, 1])
        digits, answer = self.frame_digits(index, rng)
        height, width = int(self.frame_heights[index]), int(self.frame_widths[index])
        frames = [
            torch.from_numpy(render_frame(int(digit), height, width, self.noise_std, self.jitter, rng))
            for digit in digits
        ]

        visual_tokens = int(self.num_frames[index] * self.tokens_per_frame[index])
        prefix = [BOS_ID, TOKEN_IDS["video" if self.video else "image"], TOKEN_IDS[":"]]
        question = [TOKEN_IDS[word] for word in QUESTIONS[str(self.question_kinds[index])]]
        input_ids = torch.tensor([*prefix, *[IMAGE_ID] * visual_tokens, *question, DIGIT_IDS[answer]])
        labels = torch.full_like(input_ids, -100)
        labels[-1] = input_ids[-1]
        visual_index = torch.zeros_like(input_ids)
        visual_index[len(prefix) : len(prefix) + visual_tokens] = torch.arange(1, visual_tokens + 1)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "visual_index": visual_index,
            "pixel_values": frames,
            "answer": answer,
            "question": str(self.question_kinds[index]),
        }
