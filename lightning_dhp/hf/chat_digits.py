"""A chat dataset of real files (MP4 clips and PNG images of drawn digits, a JSONL manifest) and the tiny
Qwen-VL processors and models that train on it, all built locally: no download.

:func:`write_chat_digits` writes the files; :func:`tiny_processor` assembles a Qwen2.5-VL or Qwen3-VL processor
from the model family's own image and video processor classes, a byte-level BPE tokenizer trained here on the
task's words with the family's special tokens, and a chat template in the family's format; :func:`tiny_model`
builds a model from a config whose vocabulary and special token ids are the tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_dhp.data.video_digits import render_frame

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
QUESTIONS = {"image": "Which digit is this?", "video": "Which digit does the clip show?"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The Qwen2-VL / Qwen2.5-VL chat template (a default system turn, one placeholder per image and video); Qwen3-VL's has
# no default system turn.
_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}{{ raise_exception('unknown content type ' ~ part['type']) }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_template(family: str) -> str:
    default_system = "false" if family == "qwen3_vl" else "true"
    return "{% set default_system = " + default_system + " %}" + _QWEN_TEMPLATE


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on the task's words, with the Qwen-VL special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["system user assistant You are a helpful assistant.", *QUESTIONS.values(), *DIGIT_WORDS,
              " ".join(str(d) for d in range(10)), "<0.5 seconds> <12.25 seconds>"]
    tokenizer.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=160, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))


def tiny_processor(family: str = "qwen3_vl", patch_size: int = 4, max_pixels: int = 48 * 48,
                   fps: float = 2.0) -> Any:
    """A ``family`` ("qwen2_vl", "qwen2_5_vl" or "qwen3_vl") processor for the tiny models: ``patch_size``-pixel
    patches merged 2 x 2, frames resized to at most ``max_pixels``, videos sampled at ``fps`` (Qwen3-VL's own
    sampling; the Qwen2-VL video processor samples only when asked, so it is asked here)."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    factor = 2 * patch_size
    size = {"shortest_edge": factor * factor, "longest_edge": max_pixels}
    images = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2, size=size)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        videos = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2, size=size,
                                       do_sample_frames=True, fps=fps, min_frames=2, cap_pixels_per_frame=False)
        processor_class = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    elif family == "qwen3_vl":
        videos = Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": factor * factor, "longest_edge": 64 * max_pixels},
                                       fps=fps, min_frames=2, cap_pixels_per_frame=False)
        processor_class = Qwen3VLProcessor
    else:
        raise ValueError(f"family is 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl', got {family!r}")
    return processor_class(image_processor=images, tokenizer=tiny_tokenizer(), video_processor=videos,
                           chat_template=chat_template(family))


def tiny_model(family: str = "qwen3_vl", patch_size: int = 4, seed: int = 0, **sizes: Any) -> Any:
    """A tiny ``family`` ("qwen2_vl" or "qwen3_vl") model from a config (random init, seeded) for
    :func:`tiny_processor`'s vocabulary and patches; ``sizes`` as
    :func:`lightning_dhp.hf.video_digits.tiny_qwen3_vl` takes them."""
    from lightning_dhp.hf.video_digits import tiny_qwen2_vl, tiny_qwen3_vl

    tokenizer = tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    build = {"qwen2_vl": tiny_qwen2_vl, "qwen3_vl": tiny_qwen3_vl}[family]
    return build(vocab_size=len(tokenizer), token_ids=ids, patch_size=patch_size, seed=seed, **sizes)


def write_chat_digits(directory: str | Path, num_videos: int = 200, num_images: int = 200, seed: int = 0,
                      frame_sizes: tuple[int, ...] = (32, 40, 48), durations_s: tuple[float, float] = (1.0, 4.0),
                      fps_choices: tuple[int, ...] = (4, 6, 8), gop_size: int = 4) -> Path:
    """Write ``num_videos`` MP4 clips (H.264, one digit drawn in every frame, random durations, rates and sizes),
    ``num_images`` PNG images of one digit, and ``manifest.jsonl`` asking which digit each shows, under
    ``directory``; returns the manifest's path. Deterministic per ``seed``."""
    from PIL import Image

    directory = Path(directory)
    (directory / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_videos + num_images):
        kind = "video" if index < num_videos else "image"
        digit = int(rng.integers(10))
        height, width = (int(rng.choice(frame_sizes)) for _ in range(2))
        name = f"media/{kind}_{index:05d}." + ("mp4" if kind == "video" else "png")
        if kind == "video":
            fps = int(rng.choice(fps_choices))
            frames = max(2, round(rng.uniform(*durations_s) * fps))
            write_video(directory / name, [_pixels(digit, height, width, rng) for _ in range(frames)], fps, gop_size)
        else:
            Image.fromarray(_pixels(digit, height, width, rng)).save(directory / name)
        records.append({"messages": [
            {"role": "user", "content": [{"type": kind, kind: name}, {"type": "text", "text": QUESTIONS[kind]}]},
            {"role": "assistant", "content": [{"type": "text", "text": str(digit)}]}]})
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    return manifest


def _pixels(digit: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    frame = render_frame(digit, height, width, noise_std=0.03, jitter=1, rng=rng)
    return np.clip((frame.transpose(1, 2, 0) + 0.5) * 255, 0, 255).astype(np.uint8)


def write_video(path: str | Path, frames: list[np.ndarray], fps: int, gop_size: int = 12,
                lossless: bool = True) -> None:
    """``frames`` (H x W x 3 uint8, even sizes) as an H.264 MP4 at ``fps``, a keyframe every ``gop_size`` frames.

    ``lossless`` (the default) makes the decoded pixels exactly the converted input on every run: lossy x264
    encodes of the same frames differ from run to run (PyAV 18: about one clip in five re-encoded in one process),
    and training on them is then not reproducible. Lossy (CRF 12) files are smaller and decode as real clips do.
    """
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0"} if lossless else {"crf": "12"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.codec_context.gop_size = "yuv420p", gop_size
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@torch.no_grad()
def answer_accuracy(module: Any, dataset: Any, indices: list[int]) -> float:
    """Fraction of records ``indices`` of a :class:`~lightning_dhp.hf.chat.ChatDataset` whose first answer token is
    the argmax at its position (teacher forcing, whole pixels, one process, the model's own HF forward)."""
    from lightning_dhp.attention import ZigzagLayout
    from lightning_dhp.distributed import CPContext, cp_context

    model = module.model
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    correct = 0
    try:
        for index in indices:
            item = dataset.processed(index)
            labels = item.pop("labels")
            answer = int(torch.nonzero(labels != -100)[0])
            inputs = {key: value.to(device) for key, value in item.items() if isinstance(value, torch.Tensor)}
            input_ids = inputs.pop("input_ids")[None]
            inputs["mm_token_type_ids"] = (input_ids == model.config.image_token_id).long() + \
                2 * (input_ids == model.config.video_token_id).long()
            with cp_context(CPContext(ZigzagLayout([input_ids.shape[1]], 1, 0), None, (0,))):
                logits = model(input_ids=input_ids, use_cache=False, **inputs).logits
            correct += int(logits[0, answer - 1].argmax() == input_ids[0, answer])
    finally:
        model.train(was_training)
    return correct / len(indices)
