import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Trainer

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.data.video_digits import BOS_ID, TOKEN_IDS, VideoDigits
from lightning_dhp.distributed.context import CPContext, cp_context
from lightning_dhp.lightning import DHPBatchInfo, DHPDataModule, DHPStrategy
from lightning_dhp.lightning.collate import DHPPacking
from lightning_dhp.models import (
    TinyVLM,
    TinyVLMConfig,
    VLMTask,
    answer_accuracy,
    fit_single_process,
    single_process_batch,
)
from lightning_dhp.testing import run_distributed
from tests.helpers import assert_parameters_match

TINY = TinyVLMConfig(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    max_patches_per_side=4,
    vision_hidden_size=16,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate_size=32,
)


def _video_items(count: int, seed: int) -> list[dict]:
    """Short videos of 8 and 16 px frames (1 to 4 visual tokens a frame, 1 to 6 frames)."""
    dataset = VideoDigits(count, seed=seed, durations_s=[4.0, 12.0, 24.0], sample_fps=0.25, frame_sizes=(8, 16))
    return [dataset[index] for index in range(count)]


def _text_item(length: int) -> dict:
    input_ids = torch.full((length,), TOKEN_IDS["digit"])
    input_ids[0] = BOS_ID
    return {"input_ids": input_ids, "visual_index": torch.zeros(length, dtype=torch.long), "pixel_values": []}


def _tiny_model() -> TinyVLM:
    torch.manual_seed(0)
    return TinyVLM(TINY).double()


def _forward(model: TinyVLM, items: list[dict], layout: ZigzagLayout, group=None, ranks=(0,)) -> torch.Tensor:
    """Logits of this rank's rows of ``items`` sharded by ``layout``, inside its CP context."""
    with cp_context(CPContext(layout, group, tuple(ranks))):
        return model(
            layout.shard(torch.cat([item["input_ids"] for item in items])),
            layout.position_ids,
            layout.shard(torch.cat([item["visual_index"] for item in items])),
            layout.sequence_ids,
            [item["pixel_values"] for item in items],
        )


def _loss_weights(items: list[dict]) -> torch.Tensor:
    """Fixed random weights on every row's logits, so the loss reaches every token of every sample."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(
        sum(len(item["input_ids"]) for item in items), TINY.vocab_size, generator=generator, dtype=torch.float64
    )


def _frames_touched(items: list[dict], layout: ZigzagLayout) -> int:
    """Frames with at least one visual token among ``layout``'s valid local rows."""
    visual_index = layout.shard(torch.cat([item["visual_index"] for item in items]))
    touched = set()
    for row in torch.nonzero(visual_index > 0).flatten().tolist():
        frames = items[int(layout.sequence_ids[row])]["pixel_values"]
        patch_ends = np.cumsum([(frame.shape[1] // 8) * (frame.shape[2] // 8) for frame in frames])
        touched.add(
            (int(layout.sequence_ids[row]), int(np.searchsorted(patch_ends, int(visual_index[row]) - 1, side="right")))
        )
    return len(touched)


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Softmax attention of one sequence written out: (L, Hq, D) queries, (L, Hkv, D) keys and values."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # query head h reads KV h // group
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _oracle_vision(model: TinyVLM, frame: torch.Tensor) -> torch.Tensor:
    """Features of one frame's patches (row-major), from the encoder's weights with plain PyTorch ops."""
    encoder, size = model.vision, TINY.patch_size
    channels, height, width = frame.shape
    rows, cols = height // size, width // size
    patches = frame.reshape(channels, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)
    grid_rows, grid_cols = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    x = (F.linear(patches, encoder.patch_embed.weight, encoder.patch_embed.bias)
         + encoder.row_embed.weight[grid_rows.flatten()] + encoder.col_embed.weight[grid_cols.flatten()])
    width_v = TINY.vision_hidden_size
    for block in encoder.blocks:
        normed = F.layer_norm(x, (width_v,), block.attention_norm.weight, block.attention_norm.bias)
        q, k, v = F.linear(normed, block.qkv.weight, block.qkv.bias).view(len(x), 3, TINY.vision_heads, -1).unbind(1)
        x = x + F.linear(_dense_attention(q, k, v, causal=False).flatten(1), block.out.weight, block.out.bias)
        first, _, second = block.mlp
        normed = F.layer_norm(x, (width_v,), block.mlp_norm.weight, block.mlp_norm.bias)
        x = x + F.linear(F.gelu(F.linear(normed, first.weight, first.bias)), second.weight, second.bias)
    return F.layer_norm(x, (width_v,), encoder.norm.weight, encoder.norm.bias)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + TINY.norm_eps) * weight


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding at positions 0..L-1 of (L, H, D), halves rotated as pairs (first_i, second_i)."""
    head_dim = x.shape[-1]
    inv_freq = TINY.rope_theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(len(x), dtype=torch.float64)[:, None, None] * inv_freq
    first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return torch.cat([first * angles.cos() - second * angles.sin(), first * angles.sin() + second * angles.cos()], -1)


def _oracle_logits(model: TinyVLM, item: dict) -> torch.Tensor:
    """Float64 logits of one sample, alone: no packing, no layout, no cp_attention; only the weights are shared."""
    input_ids, visual_index = item["input_ids"], item["visual_index"]
    hidden = model.embed_tokens.weight[input_ids]
    if item["pixel_values"]:
        features = torch.cat([_oracle_vision(model, frame.double()) for frame in item["pixel_values"]])
        first, _, second = model.projector
        projected = F.linear(F.gelu(F.linear(features, first.weight, first.bias)), second.weight, second.bias)
        visual = visual_index > 0
        hidden = hidden.masked_scatter(visual[:, None], projected[visual_index[visual] - 1])
    heads, kv_heads, head_dim = TINY.num_heads, TINY.num_kv_heads, TINY.hidden_size // TINY.num_heads
    for layer in model.layers:
        attention, mlp = layer.attention, layer.mlp
        normed = _rms_norm(hidden, layer.attention_norm.weight)
        q = _rope(F.linear(normed, attention.q_proj.weight).view(len(hidden), heads, head_dim))
        k = _rope(F.linear(normed, attention.k_proj.weight).view(len(hidden), kv_heads, head_dim))
        v = F.linear(normed, attention.v_proj.weight).view(len(hidden), kv_heads, head_dim)
        hidden = hidden + F.linear(_dense_attention(q, k, v, causal=True).flatten(1), attention.o_proj.weight)
        normed = _rms_norm(hidden, layer.mlp_norm.weight)
        gated = F.silu(F.linear(normed, mlp.gate_proj.weight)) * F.linear(normed, mlp.up_proj.weight)
        hidden = hidden + F.linear(gated, mlp.down_proj.weight)
    return F.linear(_rms_norm(hidden, model.norm.weight), model.lm_head.weight)


# Rounds of groups over 4 ranks: (group ranks, item set name); ranks outside every group idle.
ROUNDS = (
    (((0, 1, 2, 3), "mixed"),),
    (((0, 1, 2), "videos"), ((3,), "one_video")),
    (((0, 1), "videos"), ((2, 3), "text_only")),
)


def _item_sets() -> dict[str, list[dict]]:
    videos = _video_items(4, seed=5)
    return {
        "mixed": [*videos[:3], _text_item(5)],
        "videos": videos[:3],
        "one_video": videos[3:],
        "text_only": [_text_item(9), _text_item(3)],
    }


def _cp_rounds(rank: int, world_size: int, item_sets: dict[str, list[dict]]) -> list[dict | None]:
    model = _tiny_model()
    encoded_frames = []
    model.vision.register_forward_hook(lambda module, args, output: encoded_frames.append(len(args[0])))
    results: list[dict | None] = []
    for groups in ROUNDS:
        process_groups = {ranks: dist.new_group(list(ranks)) for ranks, _ in groups if len(ranks) > 1}
        mine = [(ranks, name) for ranks, name in groups if rank in ranks]
        if not mine:
            results.append(None)
            continue
        ((ranks, name),) = mine
        items = item_sets[name]
        layout = ZigzagLayout([len(item["input_ids"]) for item in items], len(ranks), ranks.index(rank))
        model.zero_grad(set_to_none=True)
        encoded_frames.clear()
        logits = _forward(model, items, layout, process_groups.get(ranks), ranks)
        (logits * layout.shard(_loss_weights(items))).sum().backward()
        results.append(
            {
                "logits": logits.detach(),
                "layout_rank": layout.rank,
                "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
                "encoded_frames": sum(encoded_frames),
            }
        )
    return results


def test_forward_and_gradients_under_cp_equal_a_dense_per_sample_oracle_in_float64():
    item_sets = _item_sets()
    results = run_distributed(_cp_rounds, 4, item_sets, timeout_s=240)
    for round_index, groups in enumerate(ROUNDS):
        for ranks, name in groups:
            items = item_sets[name]
            model = _tiny_model()
            full_layout = ZigzagLayout([len(item["input_ids"]) for item in items], 1, 0)
            expected_logits = torch.cat([_oracle_logits(model, item) for item in items])
            (expected_logits * _loss_weights(items)).sum().backward()

            parts = [results[rank][round_index] for rank in ranks]
            layout = ZigzagLayout(full_layout.seq_lens, len(ranks), 0)
            torch.testing.assert_close(
                layout.unshard([part["logits"] for part in parts]),
                expected_logits,
                rtol=1e-10,
                atol=1e-10,
                msg=lambda m, ranks=ranks: f"{ranks}: {m}",
            )
            for param_name, parameter in model.named_parameters():
                summed = sum(part["grads"][param_name] for part in parts)
                # A text-only sample never reaches the vision weights in the oracle: zero gradient there.
                expected_grad = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
                torch.testing.assert_close(
                    summed,
                    expected_grad,
                    rtol=1e-9,
                    atol=1e-10,
                    msg=lambda m, n=param_name, ranks=ranks: f"{ranks} {n}: {m}",
                )
            vision_grad = sum(part["grads"]["vision.patch_embed.weight"] for part in parts).abs().sum()
            assert (vision_grad > 0) == (name != "text_only")
            for part, rank in zip(parts, ranks, strict=True):
                rank_layout = ZigzagLayout(full_layout.seq_lens, len(ranks), part["layout_rank"])
                assert part["encoded_frames"] == _frames_touched(items, rank_layout), (ranks, rank)
    assert results[3][0]["encoded_frames"] < sum(len(item["pixel_values"]) for item in item_sets["mixed"])


def test_packed_forward_at_degree_one_equals_the_dense_oracle():
    items = [*_video_items(3, seed=6), _text_item(4)]
    model = _tiny_model()
    logits = _forward(model, items, ZigzagLayout([len(item["input_ids"]) for item in items], 1, 0))
    expected = torch.cat([_oracle_logits(model, item) for item in items])
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


def test_forward_shapes_and_seeded_construction():
    items = _video_items(3, seed=0)
    layout = ZigzagLayout([len(item["input_ids"]) for item in items], 1, 0)
    first, second = _tiny_model(), _tiny_model()
    logits = _forward(first, items, layout)
    assert logits.shape == (layout.num_tokens, TINY.vocab_size)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(_forward(second, items, layout), logits, rtol=0, atol=0)


def test_frames_of_different_sizes_encode_independently():
    model = _tiny_model()
    small, large = torch.randn(3, 8, 16, dtype=torch.float64), torch.randn(3, 16, 24, dtype=torch.float64)
    together = model.vision([small, large])
    assert together.shape == (2 + 6, TINY.vision_hidden_size)
    torch.testing.assert_close(together[:2], model.vision([small]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(together[2:], model.vision([large]), rtol=1e-12, atol=1e-12)


def test_bad_frames_and_visual_indices_are_named():
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"frame of 8x12 px .* multiples of patch_size=8"):
        model.vision([torch.zeros(3, 8, 12)])
    with pytest.raises(ValueError, match=r"frame of 8x40 px .* at most 32 px"):
        model.vision([torch.zeros(3, 8, 40)])
    item = _video_items(1, seed=0)[0]
    item["visual_index"][item["visual_index"] > 0] += 1
    layout = ZigzagLayout([len(item["input_ids"])], 1, 0)
    with pytest.raises(ValueError, match=r"sample 0 of the group has visual token \d+ but its \d+ frame\(s\) hold"):
        _forward(model, [item], layout)
    item["pixel_values"] = []
    with pytest.raises(
        ValueError, match=r"sample 0 of the group has visual token \d+ but its 0 frame\(s\) hold only 0"
    ):
        _forward(model, [item], layout)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 3}, "num_heads=3 must split the hidden size 32"),
        ({"num_kv_heads": 3}, "num_kv_heads=3 must divide num_heads=4"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    fields = {**vars(TINY), **overrides}
    with pytest.raises(ValueError, match=message):
        TinyVLMConfig(**fields)


def _easy_digits(count: int, seed: int) -> VideoDigits:
    """Single 16 px images, centred, little noise: learnable in a few dozen steps."""
    return VideoDigits.single_image(count, seed=seed, frame_sizes=(16,), jitter=0, noise_std=0.05)


def test_short_training_raises_answer_accuracy_far_above_chance():
    torch.manual_seed(0)
    task = VLMTask(TinyVLMConfig(hidden_size=48, num_heads=4, num_layers=2, vision_layers=1), lr=2e-3, warmup_steps=0)
    held_out = _easy_digits(60, seed=1)
    before = answer_accuracy(task.model, held_out)
    losses = fit_single_process(task, _easy_digits(1000, seed=0), steps=40, samples_per_step=32)
    after = answer_accuracy(task.model, held_out)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert after >= 0.5 > before + 0.3, (before, after)  # chance is 0.1
    assert answer_accuracy(task.model, held_out, max_tokens=1) == after  # one sample per forward


def test_training_step_returns_this_ranks_share_of_the_global_mean():
    task = VLMTask(TINY)
    items = _video_items(3, seed=2)
    batch = single_process_batch(items, [0, 1, 2], global_loss_tokens=3 * len(items))
    with cp_context(CPContext(batch["dhp"].layout, None, (0,))):
        share = task.training_step(batch, 0)
        logits = task(batch)
    labelled = batch["labels"] != -100
    mean_loss = torch.nn.functional.cross_entropy(logits[labelled], batch["labels"][labelled])
    torch.testing.assert_close(3 * share, mean_loss)


def test_an_idle_ranks_empty_batch_gives_a_zero_loss_that_reaches_every_parameter():
    task = VLMTask(TINY)
    batch, layout = DHPPacking(VideoDigits.token_fields).empty_batch(single_process_batch(_video_items(1, seed=0), [0]))
    batch["dhp"] = DHPBatchInfo(layout, (0,), (), 0, 1, 0, global_loss_tokens=5, global_samples=0)
    with cp_context(CPContext(layout, None, (0,))):
        loss = task.training_step(batch, 0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in task.parameters())


def test_validation_under_dhp_strategy_logs_the_exact_loss_and_accuracy():
    train, val = _video_items(4, seed=3), VideoDigits(5, seed=4, durations_s=[4.0, 12.0], frame_sizes=(8, 16))
    task = VLMTask(TINY)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=DHPStrategy(),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = DHPDataModule(train, [len(item["input_ids"]) for item in train], 2, val_dataset=val,
                         token_fields=VideoDigits.token_fields)
    trainer.fit(task, datamodule=data)  # validates once, at the end of its only epoch, after the last step
    metrics = trainer.callback_metrics

    batch = single_process_batch([val[index] for index in range(len(val))], range(len(val)))
    with torch.no_grad(), cp_context(CPContext(batch["dhp"].layout, None, (0,))):
        labelled = batch["labels"] != -100
        expected_loss = torch.nn.functional.cross_entropy(task(batch)[labelled], batch["labels"][labelled])
    assert metrics["val/loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert metrics["val/answer_accuracy"] == pytest.approx(answer_accuracy(task.model, val))


def test_a_missing_init_checkpoint_is_named(tmp_path):
    missing = tmp_path / "pretrained.pt"
    with pytest.raises(FileNotFoundError, match=f"init_checkpoint '{missing}' does not exist; run the pretraining"):
        VLMTask(TINY, init_checkpoint=str(missing))


def test_init_checkpoint_restores_the_model(tmp_path):
    path = tmp_path / "pretrained.pt"
    torch.save(_tiny_model().float().state_dict(), path)
    restored = VLMTask(TINY, init_checkpoint=str(path))
    assert_parameters_match(restored.model.state_dict(), _tiny_model().float().state_dict(), rtol=0, atol=0)
