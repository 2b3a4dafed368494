"""Qwen2-VL / Qwen2.5-VL items under DHP: M-RoPE positions before sharding, vision features per rank.

:class:`QwenVLItems` runs on every item in the loader (so a bad item's error names its dataset
index): it checks the image/video placeholder tokens against ``image_grid_thw`` / ``video_grid_thw``,
computes the sample's 3-D M-RoPE positions with the model's own ``get_rope_index`` on the whole
sample, and marks each placeholder token with its row of the sample's vision features. Both travel
as token fields, sharded like ``input_ids``. In the step, :func:`embed_with_vision` (run by a
pre-hook of the language model, inside the model's own forward) encodes each image and video of the
group once, on one rank of the group, and gives every rank the features of the tokens it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.attention.ring import RingExchange
from lightning_dhp.distributed.context import current_cp_context

POSITIONS = "position_ids"  # (T, 3) M-RoPE positions per item; a token field replaces in-sequence positions
VISION_ROWS = "vision_rows"  # 1 + the token's row in the sample's vision features (images, then videos); 0: text
TOKEN_FIELDS = (POSITIONS, VISION_ROWS)
VISION_KWARG = "dhp_vision"  # a model kwarg: (batch, layout) for the language model's pre-hook
_ONE_ROW_FIELDS = ("input_ids", "labels", "attention_mask", "mm_token_type_ids")
_FEATURE_TAG, _FEATURE_GRAD_TAG = 2, 3  # point-to-point tags distinct from ring attention's
_VISUALS = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


class QwenVLItems:
    """The item transform of a Qwen-VL model (picklable: it holds the config and the class, not the model).

    Takes one sample as the processor returns it (``input_ids`` 1-D or ``(1, T)``, optional ``labels``,
    ``pixel_values`` + ``image_grid_thw``, ``pixel_values_videos`` + ``video_grid_thw``,
    ``second_per_grid_ts``) and returns it with ``position_ids`` ``(T, 3)`` and ``vision_rows`` ``(T,)``.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.rope_owner = type(model.model)  # the class whose get_rope_index computes M-RoPE positions
        self.config: PretrainedConfig = model.config
        self.merge = int(model.config.vision_config.spatial_merge_size)

    # get_rope_index is called with this object as ``self``: it reads ``config`` and this method.
    def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.rope_owner.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        item = dict(item)
        for key in _ONE_ROW_FIELDS:
            if isinstance(item.get(key), torch.Tensor) and item[key].dim() == 2 and item[key].shape[0] == 1:
                item[key] = item[key][0]
        item.pop("mm_token_type_ids", None)  # recomputed below from the placeholder token ids
        attention_mask = item.pop("attention_mask", None)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the item's attention_mask masks some tokens: give one unpadded sample per item")
        input_ids = item["input_ids"]
        token_types = torch.zeros_like(input_ids)
        token_types[input_ids == self.config.image_token_id] = 1
        token_types[input_ids == self.config.video_token_id] = 2
        grids = {}
        for kind_id, (kind, pixels_key, grid_key) in enumerate(_VISUALS, start=1):
            grid = item.get(grid_key)
            grid = torch.zeros(0, 3, dtype=torch.long) if grid is None else grid.long().reshape(-1, 3)
            grids[kind] = grid
            expected = (grid.prod(-1) // self.merge**2).tolist()
            runs = _runs(token_types == kind_id)
            if [end - start for start, end in runs] != expected:
                token_id = getattr(self.config, f"{kind}_token_id")
                raise ValueError(
                    f"{kind} tokens do not match {grid_key}: the sample has {len(runs)} runs of {kind} tokens "
                    f"(id {token_id}) of lengths {[end - start for start, end in runs]}, "
                    f"but {grid_key}={grid.tolist()} needs {expected} (t*h*w / spatial_merge_size**2 = "
                    f"{self.merge}**2 each, one run per {kind}); build the item with the model's processor")
            pixels = item.get(pixels_key)
            pixel_rows = 0 if pixels is None else pixels.shape[0]
            if pixel_rows != int(grid.prod(-1).sum()):
                raise ValueError(f"{pixels_key} has {pixel_rows} rows but {grid_key}={grid.tolist()} needs "
                                 f"{int(grid.prod(-1).sum())} (t*h*w patches per {kind})")
            item[grid_key] = grid
            item.setdefault(pixels_key, None)
        positions, _ = self.rope_owner.get_rope_index(
            self, input_ids[None], mm_token_type_ids=token_types[None],
            image_grid_thw=grids["image"] if len(grids["image"]) else None,
            video_grid_thw=grids["video"] if len(grids["video"]) else None,
            second_per_grid_ts=item.pop("second_per_grid_ts", None))
        item[POSITIONS] = positions[:, 0].T.contiguous()
        vision_rows = torch.zeros_like(input_ids)
        images = token_types == 1
        vision_rows[images] = torch.arange(1, int(images.sum()) + 1)
        vision_rows[token_types == 2] = torch.arange(1, int((token_types == 2).sum()) + 1) + int(images.sum())
        item[VISION_ROWS] = vision_rows
        return item


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of every run of True in a 1-D mask."""
    edges = torch.diff(torch.nn.functional.pad(mask.long(), (1, 1)))
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist(),
                    strict=True))


@dataclass(frozen=True)
class _Visual:
    """One image or video of the group: its sample, kind, index among the sample's visuals of that kind,
    first row in the sample's vision features, tokens (merged rows) and patches."""

    sample: int
    kind: str
    index: int
    first_row: int
    tokens: int
    patches: int


def _group_visuals(batch: dict[str, Any], merge: int) -> list[_Visual]:
    """Every image and video of the group's samples, per sample images then videos (the rows' order)."""
    visuals = []
    for sample, (image_grid, video_grid) in enumerate(zip(batch["image_grid_thw"], batch["video_grid_thw"],
                                                          strict=True)):
        row = 0
        for kind, grid in (("image", image_grid), ("video", video_grid)):
            for index, patches in enumerate(grid.prod(-1).tolist()):
                visuals.append(_Visual(sample, kind, index, row, patches // merge**2, patches))
                row += patches // merge**2
    return visuals


def _owners(visuals: list[_Visual], degree: int) -> list[int]:
    """Which rank of the group encodes each visual: largest first onto the least-loaded rank (by patches)."""
    load, owners = [0] * degree, [0] * len(visuals)
    for position in sorted(range(len(visuals)), key=lambda i: -visuals[i].patches):
        owners[position] = min(range(degree), key=lambda rank: load[rank])
        load[owners[position]] += visuals[position].patches
    return owners


def _part(visuals: list[_Visual], owners: list[int], rank: int) -> list[int]:
    """The visuals ``rank`` encodes, in the order of its features: its images, then its videos."""
    return [i for kind in ("image", "video") for i, visual in enumerate(visuals)
            if owners[i] == rank and visual.kind == kind]


def _encode(model: PreTrainedModel, batch: dict[str, Any], visuals: list[_Visual],
            embeds: torch.Tensor) -> torch.Tensor:
    """Merged vision features of ``visuals`` (images before videos), one vision-tower call per kind."""
    device, dtype = embeds.device, embeds.dtype
    features = [embeds.new_zeros(0, embeds.shape[1])]
    for kind, pixels_key, grid_key in _VISUALS:
        chosen = [visual for visual in visuals if visual.kind == kind]
        if not chosen:
            continue
        pixels, grids = [], []
        for visual in chosen:
            grid = batch[grid_key][visual.sample]
            patch_starts = torch.nn.functional.pad(grid.prod(-1).cumsum(0), (1, 0)).tolist()
            pixels.append(batch[pixels_key][visual.sample][patch_starts[visual.index]:patch_starts[visual.index + 1]])
            grids.append(grid[visual.index])
        encode = model.model.get_image_features if kind == "image" else model.model.get_video_features
        features += encode(torch.cat(pixels).to(device), torch.stack(grids).to(device)).pooler_output
    return torch.cat(features).to(dtype)


class _GatherOverRing(torch.autograd.Function):
    """All-gather of the group's feature parts over the CP ring; backward sums each part's gradient
    back to its rank (every row's gradient comes from the one rank holding that token, so it is exact)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: list[int], exchange: RingExchange, rank: int) -> torch.Tensor:
        degree, longest = len(sizes), max(sizes)
        parts = [local.new_zeros(0)] * degree
        current = torch.cat([local, local.new_zeros(longest - len(local), local.shape[1])])
        parts[rank] = current
        for step in range(1, degree):
            current = exchange.start(current, _FEATURE_TAG)()
            parts[(rank - step) % degree] = current
        ctx.sizes, ctx.exchange, ctx.rank = sizes, exchange, rank
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        sizes, rank, degree = ctx.sizes, ctx.rank, len(ctx.sizes)
        starts = [sum(sizes[:r]) for r in range(degree)]
        longest = max(sizes)

        def part(r: int) -> torch.Tensor:
            piece = grad[starts[r]:starts[r] + sizes[r]]
            return torch.cat([piece, piece.new_zeros(longest - sizes[r], grad.shape[1])])

        total = part((rank - 1) % degree)  # ring reduce-scatter: part p travels p+1, p+2, ..., p
        for step in range(degree - 1):
            total = ctx.exchange.start(total.contiguous(), _FEATURE_GRAD_TAG)() + part((rank - 2 - step) % degree)
        return total[:sizes[rank]], None, None, None


def install_vision_hook(model: PreTrainedModel) -> None:
    """Let ``model``'s forward take ``dhp_vision=(batch, layout)``: its language model then gets the input
    embeddings with this rank's placeholder rows replaced by vision features (:func:`embed_with_vision`).

    The vision tower and the feature exchange run inside the model's own forward, so under FSDP they
    see the root module's parameters gathered like every other call of the step.
    """
    model.model.language_model.register_forward_pre_hook(partial(_inject_vision, model), with_kwargs=True)


def _inject_vision(model: PreTrainedModel, language_model: torch.nn.Module, args: tuple,
                   kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    request = kwargs.pop(VISION_KWARG, None)
    if request is None:
        return None
    batch, layout = request
    kwargs["inputs_embeds"] = embed_with_vision(model, batch, layout, kwargs["inputs_embeds"][0])[None]
    return args, kwargs


def embed_with_vision(model: PreTrainedModel, batch: dict[str, Any], layout: ZigzagLayout,
                      embeds: torch.Tensor) -> torch.Tensor:
    """``embeds`` ``(T_local, hidden)`` with this rank's placeholder rows replaced by vision features.

    Each image or video of the group is encoded once, by one rank of the group (balanced by
    patches); the features travel over the CP ring to the ranks holding their tokens. Encoding a
    straddling image on every rank holding some of its tokens would not be exact: HF's vision RoPE
    runs in float32, so partial gradients would be rounded before they are summed.
    """
    visuals = _group_visuals(batch, model.config.vision_config.spatial_merge_size)
    if not visuals:  # the same on every rank of the group: no collective
        return embeds
    owners = _owners(visuals, layout.degree)
    parts = [_part(visuals, owners, rank) for rank in range(layout.degree)]
    local = _encode(model, batch, [visuals[i] for i in parts[layout.rank]], embeds)
    if layout.degree > 1:
        context = current_cp_context()
        assert context is not None, "a degree > 1 layout runs inside its CP context"
        sizes = [sum(visuals[i].tokens for i in part) for part in parts]
        trains_vision = torch.is_grad_enabled() and any(p.requires_grad for p in model.model.visual.parameters())
        if trains_vision and not local.requires_grad:  # a rank encoding nothing still joins the backward exchange
            local = local.detach().requires_grad_()
        local = _GatherOverRing.apply(local, sizes, RingExchange(context.group, context.ranks, layout.rank),
                                      layout.rank)
    offsets = torch.zeros(len(visuals), dtype=torch.long)
    order = [i for part in parts for i in part]
    offsets[order] = torch.tensor([0] + [visuals[i].tokens for i in order[:-1]]).cumsum(0)
    rows = batch[VISION_ROWS].to(embeds.device) - 1
    held = torch.nonzero((rows >= 0) & layout.valid.to(embeds.device)).flatten()
    feature_index = torch.empty_like(held)
    samples = layout.sequence_ids.to(embeds.device)[held]
    for sample in set(samples.tolist()):
        ids = [i for i, visual in enumerate(visuals) if visual.sample == sample]
        first_rows = torch.tensor([visuals[i].first_row for i in ids], device=embeds.device)
        selected = samples == sample
        sample_rows = rows[held[selected]]
        which = torch.bucketize(sample_rows, first_rows, right=True) - 1
        feature_index[selected] = offsets.to(embeds.device)[torch.tensor(ids, device=embeds.device)[which]] + \
            sample_rows - first_rows[which]
    return embeds.index_put((held,), local[feature_index])
