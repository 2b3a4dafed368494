"""Qwen2-VL / Qwen2.5-VL items under DHP: M-RoPE positions before sharding, vision features per rank.

:class:`QwenVLItems` runs on every item in the loader (so a bad item's error names its dataset
index): it checks the image/video placeholder tokens against ``image_grid_thw`` / ``video_grid_thw``,
computes the sample's 3-D M-RoPE positions with the model's own ``get_rope_index`` on the whole
sample, and marks each placeholder token with its row of the sample's vision features. Both travel
as token fields, sharded like ``input_ids``. In the step, :func:`embed_with_vision` (run by a
pre-hook of the language model, inside the model's own forward) spreads the group's vision work over
its ranks (whole images, and each video's temporal patches, balanced by predicted cost), encodes each
piece once, and gives every rank the features of the tokens it holds.
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
        vision = model.config.vision_config
        self.merge = int(vision.spatial_merge_size)
        self.patch_width = int(vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)

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
            if pixels is not None and (pixels.dim() != 2 or pixels.shape[1] != self.patch_width):
                raise ValueError(
                    f"{pixels_key} has rows of shape {tuple(pixels.shape[1:])} but this vision tower takes patches "
                    f"of {self.patch_width} values (in_channels x temporal_patch_size x patch_size**2); process the "
                    "item with this model's processor")
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


def vision_patches(item: dict[str, Any]) -> int:
    """The vision patches a Qwen-VL processor's item asks its vision tower to encode (images and videos,
    before merging): what ``DHPDataModule(..., vision_patches=[...])`` wants per item. Reads the grids only."""
    return sum(int(torch.as_tensor(item[key]).reshape(-1, 3).prod(-1).sum())
               for _, _, key in _VISUALS if item.get(key) is not None)


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of every run of True in a 1-D mask."""
    edges = torch.diff(torch.nn.functional.pad(mask.long(), (1, 1)))
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist(),
                    strict=True))


# A segment of S patches costs about S * (1 + S / ATTENTION_PATCHES) patches of linear work: per patch and
# block, the linear layers of a Qwen2-VL-7B tower take 2 x 19.7M FLOPs (1280 wide, MLP ratio 4) and full
# attention 4 x S x 1280 (scores and values), so attention matches the linear work at S = 7680 patches
# (Qwen2.5-VL attends within 112-pixel windows in most blocks, so this overstates its attention).
ATTENTION_PATCHES = 7680


@dataclass(frozen=True)
class _Unit:
    """Vision work one rank encodes: a whole image, or (``split_videos``) one temporal patch of a video, which
    every Qwen-VL tower attends to as a segment of its own (transformers' vision ``cu_seqlens`` have one
    segment per temporal patch; Qwen2.5-VL's windows lie inside a frame), so its features do not depend on
    what else is encoded with it.

    ``grid`` is the unit's own (t, h, w); ``first_row`` its first row in the sample's vision features (images,
    then videos); ``first_patch`` its first row in the sample's pixel values of its kind.
    """

    sample: int
    kind: str
    grid: tuple[int, int, int]
    first_row: int
    first_patch: int
    merge: int

    @property
    def patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def tokens(self) -> int:
        return self.patches // self.merge**2

    @property
    def cost(self) -> float:
        """Predicted encoding work, in patches (see :data:`ATTENTION_PATCHES`)."""
        _, h, w = self.grid
        return self.patches * (1 + h * w / ATTENTION_PATCHES)


def _group_units(batch: dict[str, Any], merge: int, split_videos: bool) -> list[_Unit]:
    """The group's vision work, in the order of each sample's features: per sample its images, then its videos
    (each cut into temporal patches when ``split_videos``)."""
    units = []
    for sample, (image_grid, video_grid) in enumerate(zip(batch["image_grid_thw"], batch["video_grid_thw"],
                                                          strict=True)):
        row = 0
        for kind, grid in (("image", image_grid), ("video", video_grid)):
            patch = 0
            for t, h, w in grid.tolist():
                pieces = [(1, h, w)] * t if kind == "video" and split_videos else [(t, h, w)]
                for piece in pieces:
                    unit = _Unit(sample, kind, piece, row, patch, merge)
                    units.append(unit)
                    row, patch = row + unit.tokens, patch + unit.patches
    return units


def _owners(units: list[_Unit], degree: int) -> list[int]:
    """Which rank of the group encodes each unit: costliest first onto the least-loaded rank."""
    load, owners = [0.0] * degree, [0] * len(units)
    for position in sorted(range(len(units)), key=lambda i: -units[i].cost):
        owners[position] = min(range(degree), key=lambda rank: load[rank])
        load[owners[position]] += units[position].cost
    return owners


def _part(units: list[_Unit], owners: list[int], rank: int) -> list[int]:
    """The units ``rank`` encodes, in the order of its features: its images, then its videos."""
    return [i for kind in ("image", "video") for i, unit in enumerate(units) if owners[i] == rank and unit.kind == kind]


def _encode(model: PreTrainedModel, batch: dict[str, Any], units: list[_Unit], embeds: torch.Tensor) -> torch.Tensor:
    """Merged vision features of ``units`` (images before videos), one vision-tower call per kind."""
    device, dtype = embeds.device, embeds.dtype
    features = [embeds.new_zeros(0, embeds.shape[1])]
    for kind, pixels_key, _ in _VISUALS:
        chosen = [unit for unit in units if unit.kind == kind]
        if not chosen:
            continue
        pixels = torch.cat([batch[pixels_key][unit.sample][unit.first_patch:unit.first_patch + unit.patches]
                            for unit in chosen])
        grids = torch.tensor([unit.grid for unit in chosen])
        encode = model.model.get_image_features if kind == "image" else model.model.get_video_features
        features += encode(pixels.to(device), grids.to(device)).pooler_output
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


def install_vision_hook(model: PreTrainedModel, split_videos: bool = True) -> None:
    """Let ``model``'s forward take ``dhp_vision=(batch, layout)``: its language model then gets the input
    embeddings with this rank's placeholder rows replaced by vision features (:func:`embed_with_vision`).

    The vision tower and the feature exchange run inside the model's own forward, so under FSDP they
    see the root module's parameters gathered like every other call of the step.
    """
    model.model.language_model.register_forward_pre_hook(partial(_inject_vision, model, split_videos),
                                                         with_kwargs=True)


def _inject_vision(model: PreTrainedModel, split_videos: bool, language_model: torch.nn.Module, args: tuple,
                   kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    request = kwargs.pop(VISION_KWARG, None)
    if request is None:
        return None
    batch, layout = request
    kwargs["inputs_embeds"] = embed_with_vision(model, batch, layout, kwargs["inputs_embeds"][0], split_videos)[None]
    return args, kwargs


def embed_with_vision(model: PreTrainedModel, batch: dict[str, Any], layout: ZigzagLayout,
                      embeds: torch.Tensor, split_videos: bool = True) -> torch.Tensor:
    """``embeds`` ``(T_local, hidden)`` with this rank's placeholder rows replaced by vision features.

    The group's vision work is cut into units (whole images; each video temporal patch when
    ``split_videos``) spread over the group's ranks balanced by predicted cost; each unit is encoded once, by
    one rank, and the features travel over the CP ring to the ranks holding their tokens. (Encoding a unit on
    every rank holding some of its tokens would not be exact: HF's vision RoPE rounds q and k to float32, so
    the partial gradients would be rounded before they are summed.)
    """
    units = _group_units(batch, model.config.vision_config.spatial_merge_size, split_videos)
    if not units:  # the same on every rank of the group: no collective
        return embeds
    owners = _owners(units, layout.degree)
    parts = [_part(units, owners, rank) for rank in range(layout.degree)]
    local = _encode(model, batch, [units[i] for i in parts[layout.rank]], embeds)
    if layout.degree > 1:
        context = current_cp_context()
        assert context is not None, "a degree > 1 layout runs inside its CP context"
        sizes = [sum(units[i].tokens for i in part) for part in parts]
        trains_vision = torch.is_grad_enabled() and any(p.requires_grad for p in model.model.visual.parameters())
        if trains_vision and not local.requires_grad:  # a rank encoding nothing still joins the backward exchange
            local = local.detach().requires_grad_()
        local = _GatherOverRing.apply(local, sizes, RingExchange(context.group, context.ranks, layout.rank),
                                      layout.rank)
    offsets = torch.zeros(len(units), dtype=torch.long)
    order = [i for part in parts for i in part]
    offsets[order] = torch.tensor([0] + [units[i].tokens for i in order[:-1]]).cumsum(0)
    rows = batch[VISION_ROWS].to(embeds.device) - 1
    held = torch.nonzero((rows >= 0) & layout.valid.to(embeds.device)).flatten()
    feature_index = torch.empty_like(held)
    samples = layout.sequence_ids.to(embeds.device)[held]
    for sample in set(samples.tolist()):
        ids = [i for i, unit in enumerate(units) if unit.sample == sample]
        first_rows = torch.tensor([units[i].first_row for i in ids], device=embeds.device)
        selected = samples == sample
        sample_rows = rows[held[selected]]
        which = torch.bucketize(sample_rows, first_rows, right=True) - 1
        feature_index[selected] = offsets.to(embeds.device)[torch.tensor(ids, device=embeds.device)[which]] + \
            sample_rows - first_rows[which]
    return embeds.index_put((held,), local[feature_index])
