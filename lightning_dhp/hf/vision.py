"""Multimodal Hugging Face models under DHP: the contract of a model family, and the engine that spreads a
CP group's vision work over its ranks.

A family (one file in ``lightning_dhp/hf/families/``) knows one kind of model's items and vision tower. In the
loader, as the item transform, it checks each item's placeholder tokens against its visual inputs (so a bad
item's error names its dataset index), marks every placeholder token with its row of the sample's vision
features (``vision_rows``) and, for M-RoPE models, computes the sample's positions before sharding. In the
step it cuts the group's vision work into independent units (an image, a tile, a video frame or temporal
patch), encodes units with the model's own ``get_image_features`` / ``get_video_features``, and wraps this
rank's features as the model's ``mm_encoder_outputs``.

The engine (:func:`install`) spreads the units over the group's ranks balanced by predicted cost, encodes
each once, moves the features over the CP ring to the ranks holding their tokens, and hands each rank the
features of its tokens, in its token order: the model's own forward then merges them at its placeholder
tokens (and Qwen3-VL adds its DeepStack rows after the first decoder layers), so visual tokens straddling
shard boundaries are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.attention.ring import RingExchange
from lightning_dhp.distributed.context import current_cp_context
from lightning_dhp.errors import DHPConfigError

VISION_ROWS = "vision_rows"  # 1 + the token's row in the sample's vision features (images, then videos); 0: text
VISION_KWARG = "dhp_vision"  # a model kwarg: (batch, layout) for the base model's pre-hook
KINDS = ("image", "video")
_ONE_ROW_FIELDS = ("input_ids", "labels", "attention_mask", "mm_token_type_ids")
_FEATURE_TAG, _FEATURE_GRAD_TAG = 2, 3  # point-to-point tags distinct from ring attention's

# A segment of S patches costs about S * (1 + S / ATTENTION_PATCHES) patches of linear work: per patch and
# block, the linear layers of a Qwen2-VL-7B tower take 2 x 19.7M FLOPs (1280 wide, MLP ratio 4) and full
# attention 4 x S x 1280 (scores and values), so attention matches the linear work at S = 7680 patches
# (Qwen2.5-VL attends within 112-pixel windows in most blocks, so this overstates its attention).
ATTENTION_PATCHES = 7680


def encoding_cost(segment_patches: int, segments: int = 1) -> float:
    """Predicted vision-tower work, in patches, of ``segments`` attention segments of ``segment_patches`` each."""
    return segments * segment_patches * (1 + segment_patches / ATTENTION_PATCHES)


@dataclass(frozen=True)
class VisionUnit:
    """Vision work one rank encodes, whose features do not depend on what else is encoded with it.

    ``first_row``: its first row in the sample's vision features (images, then videos); ``tokens``: its rows;
    ``first_pixel`` and ``pixels``: its rows of the sample's pixel tensor of its kind; ``info``: what the
    family needs to encode it (a Qwen unit's (t, h, w) grid, ...).
    """

    sample: int
    kind: str
    first_row: int
    tokens: int
    first_pixel: int
    pixels: int
    cost: float
    info: tuple[int, ...] = ()


class VisionFamily:
    """A model family's multimodal contract, and its item transform (picklable: it holds the config, not the model).

    Subclasses set :attr:`model_classes` and implement :meth:`check`, :meth:`sample_units`, :meth:`encode` and
    :meth:`vision_patches`; M-RoPE families also :meth:`positions`.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()  # class names, so a transformers without one still imports
    pixel_keys: ClassVar[dict[str, str]] = {"image": "pixel_values", "video": "pixel_values_videos"}
    position_rows: ClassVar[int] = 1  # > 1: a (T, rows) "position_ids" token field computed on the whole sample

    def __init__(self, model: PreTrainedModel) -> None:
        self.config = model.config
        self.token_ids = {"image": self.config.image_token_id, "video": getattr(self.config, "video_token_id", None)}
        if 0 in self.token_ids.values():
            raise DHPConfigError(f"{type(model).__name__}'s config uses token id 0 for visual placeholders, but DHP "
                                 "pads shards with token id 0; give the placeholders other ids")
        self.feature_width = self.config.get_text_config().hidden_size
        self.split_videos = True  # False: encode every video whole on one rank (a baseline to compare with)
        self.base_class = type(model.model)
        self._base: PreTrainedModel | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_base": None}

    @property
    def base(self) -> PreTrainedModel:
        """A real instance of the model's base class on the meta device (no memory; built once per process, when
        first asked), so the item transform calls HF's own functions (``get_rope_index``, ...) on the model's
        class and config."""
        if self._base is None:
            with torch.device("meta"):
                self._base = self.base_class(self.config)
        return self._base

    @property
    def token_fields(self) -> tuple[str, ...]:
        return (VISION_ROWS, "position_ids") if self.position_rows > 1 else (VISION_ROWS,)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """One sample as the processor returns it, checked, with ``vision_rows`` (and positions) added."""
        item = dict(item)
        for key in _ONE_ROW_FIELDS:
            if isinstance(item.get(key), torch.Tensor) and item[key].dim() == 2 and item[key].shape[0] == 1:
                item[key] = item[key][0]
        item.pop("mm_token_type_ids", None)  # recomputed from the placeholder token ids
        attention_mask = item.pop("attention_mask", None)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the item's attention_mask masks some tokens: give one unpadded sample per item")
        input_ids = item["input_ids"]
        token_types = torch.zeros_like(input_ids)
        for kind_id, kind in enumerate(KINDS, start=1):
            if self.token_ids[kind] is not None:
                token_types[input_ids == self.token_ids[kind]] = kind_id
        for kind_id, kind in enumerate(KINDS, start=1):
            has_pixels = item.get(self.pixel_keys.get(kind, "")) is not None
            if bool((token_types == kind_id).any()) and not has_pixels:
                raise ValueError(f"the sample has {kind} tokens (id {self.token_ids[kind]}) but no "
                                 f"{self.pixel_keys[kind]}; build the item with the model's processor")
        self.check(item, token_types)
        for key in self.pixel_keys.values():  # every item has every field, so the group's lists line up
            item.setdefault(key, None)
        if self.position_rows > 1:
            item["position_ids"] = self.positions(item, token_types)
        vision_rows = torch.zeros_like(input_ids)
        row = 0
        for kind_id in (1, 2):
            placeholders = token_types == kind_id
            vision_rows[placeholders] = torch.arange(1, int(placeholders.sum()) + 1) + row
            row += int(placeholders.sum())
        item[VISION_ROWS] = vision_rows
        return item

    def transform_group(self, batch: dict[str, Any], layout: ZigzagLayout) -> dict[str, Any]:
        """Load the pixels this rank encodes where items deferred them (``lightning_dhp.hf.ChatDataset``): in the
        loader, once the group is planned, each deferred pixel tensor becomes the rows of this rank's units."""
        kinds = {kind for kind, key in self.pixel_keys.items() if any(hasattr(p, "load") for p in batch.get(key, []))}
        if not kinds:
            return batch
        units = group_units(self, batch, layout)
        mine = _part(units, _owners(units, layout.degree), layout.rank)
        for kind in kinds:
            pixels = batch[self.pixel_keys[kind]]
            for sample, deferred in enumerate(pixels):
                if hasattr(deferred, "load"):
                    pixels[sample] = deferred.load([(units[i].first_pixel, units[i].pixels) for i in mine
                                                    if units[i].sample == sample and units[i].kind == kind])
        return batch

    def check(self, item: dict[str, Any], token_types: torch.Tensor) -> None:
        """Raise ``ValueError`` saying what the processor should have produced if the placeholders do not match
        the visual inputs; may normalise the item's visual fields in place."""
        raise NotImplementedError

    def positions(self, item: dict[str, Any], token_types: torch.Tensor) -> torch.Tensor:
        """``(T, position_rows)`` positions of the whole sample (M-RoPE families)."""
        raise NotImplementedError

    def sample_units(self, batch: dict[str, Any], sample: int, split_videos: bool) -> list[VisionUnit]:
        """The vision units of the group's ``sample``, in the order of its features."""
        raise NotImplementedError

    def encode(self, model: PreTrainedModel, kind: str, pixels: torch.Tensor, units: Sequence[VisionUnit],
               batch: dict[str, Any]) -> torch.Tensor:
        """Features ``(sum of tokens, feature_width)`` of ``units`` (all of ``kind``), whose pixel rows, in
        order, are ``pixels``."""
        raise NotImplementedError

    def encoder_outputs(self, features: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``mm_encoder_outputs`` holding, per kind, the features of this rank's placeholder tokens in order."""
        raise NotImplementedError

    def vision_patches(self, item: dict[str, Any]) -> int:
        """The patches the vision tower encodes for ``item`` (as the processor returns it): what
        ``DHPDataModule(..., vision_patches=[...])`` wants per item. Reads shapes only."""
        raise NotImplementedError


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of every run of True in a 1-D mask."""
    edges = torch.diff(torch.nn.functional.pad(mask.long(), (1, 1)))
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist(),
                    strict=True))


def group_units(family: VisionFamily, batch: dict[str, Any], layout: ZigzagLayout) -> list[VisionUnit]:
    """The vision units of the group's samples, in sample order."""
    return [unit for sample in range(len(layout.seq_lens))
            for unit in family.sample_units(batch, sample, family.split_videos)]


def install(model: PreTrainedModel, family: VisionFamily) -> None:
    """Let ``model``'s forward take ``dhp_vision=(batch, layout)``: its base model then gets this rank's vision
    features as ``mm_encoder_outputs`` (:func:`encoder_outputs`).

    The vision tower and the feature exchange run inside the model's own forward, so under FSDP they see the
    root module's parameters gathered like every other call of the step.
    """
    model.model.register_forward_pre_hook(partial(_inject, model, family), with_kwargs=True)


def _inject(model: PreTrainedModel, family: VisionFamily, base_model: torch.nn.Module, args: tuple,
            kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    request = kwargs.pop(VISION_KWARG, None)
    if request is None:
        return None
    batch, layout = request
    outputs = encoder_outputs(model, family, batch, layout)
    if outputs:
        kwargs["mm_encoder_outputs"] = outputs
    return args, kwargs


def _owners(units: list[VisionUnit], degree: int) -> list[int]:
    """Which rank of the group encodes each unit: costliest first onto the least-loaded rank."""
    load, owners = [0.0] * degree, [0] * len(units)
    for position in sorted(range(len(units)), key=lambda i: -units[i].cost):
        owners[position] = min(range(degree), key=lambda rank: load[rank])
        load[owners[position]] += units[position].cost
    return owners


def _part(units: list[VisionUnit], owners: list[int], rank: int) -> list[int]:
    """The units ``rank`` encodes, in the order of its features: its images, then its videos."""
    return [i for kind in KINDS for i, unit in enumerate(units) if owners[i] == rank and unit.kind == kind]


def _encode(model: PreTrainedModel, family: VisionFamily, batch: dict[str, Any], units: list[VisionUnit],
            device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Features of ``units`` (images before videos), one family ``encode`` call per kind."""
    features = [torch.zeros(0, family.feature_width, device=device, dtype=dtype)]
    for kind in KINDS:
        chosen = [unit for unit in units if unit.kind == kind]
        if chosen:
            pixels = torch.cat([batch[family.pixel_keys[kind]][unit.sample][unit.first_pixel:
                                                                             unit.first_pixel + unit.pixels]
                                for unit in chosen])
            features.append(family.encode(model, kind, pixels.to(device), chosen, batch).to(dtype))
    return torch.cat(features)


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


def encoder_outputs(model: PreTrainedModel, family: VisionFamily, batch: dict[str, Any],
                    layout: ZigzagLayout) -> dict[str, Any]:
    """This rank's ``mm_encoder_outputs``: per kind present in the group, the features of the placeholder tokens
    this rank holds, in its token order (empty when it holds none, so the exchange's backward runs everywhere).

    The group's vision work is cut into units (:meth:`VisionFamily.sample_units`) spread over the group's
    ranks balanced by predicted cost; each unit is encoded once, by one rank, and the features travel over
    the CP ring to the ranks holding their tokens. (Encoding a unit on every rank holding some of its tokens
    would not be exact: HF's vision RoPE rounds q and k to float32, so the partial gradients would be rounded
    before they are summed.)
    """
    units = group_units(family, batch, layout)
    if not units:  # the same on every rank of the group: no collective
        return {}
    embedding = model.get_input_embeddings().weight
    owners = _owners(units, layout.degree)
    parts = [_part(units, owners, rank) for rank in range(layout.degree)]
    features = _encode(model, family, batch, [units[i] for i in parts[layout.rank]], embedding.device,
                       embedding.dtype)
    if layout.degree > 1:
        context = current_cp_context()
        assert context is not None, "a degree > 1 layout runs inside its CP context"
        sizes = [sum(units[i].tokens for i in part) for part in parts]
        trains_vision = torch.is_grad_enabled() and any(
            p.requires_grad for name, p in model.model.named_parameters() if not name.startswith("language_model."))
        if trains_vision and not features.requires_grad:  # a rank encoding nothing still joins the backward exchange
            features = features.detach().requires_grad_()
        features = _GatherOverRing.apply(features, sizes, RingExchange(context.group, context.ranks, layout.rank),
                                         layout.rank)
    device = embedding.device
    offsets = torch.zeros(len(units), dtype=torch.long)
    order = [i for part in parts for i in part]
    offsets[order] = torch.tensor([0] + [units[i].tokens for i in order[:-1]]).cumsum(0)
    rows = batch[VISION_ROWS].to(device) - 1
    held = torch.nonzero((rows >= 0) & layout.valid.to(device)).flatten()
    feature_index = torch.empty_like(held)
    samples = layout.sequence_ids.to(device)[held]
    for sample in set(samples.tolist()):
        ids = [i for i, unit in enumerate(units) if unit.sample == sample]
        first_rows = torch.tensor([units[i].first_row for i in ids], device=device)
        selected = samples == sample
        sample_rows = rows[held[selected]]
        which = torch.bucketize(sample_rows, first_rows, right=True) - 1
        feature_index[selected] = offsets.to(device)[torch.tensor(ids, device=device)[which]] + \
            sample_rows - first_rows[which]
    held_ids = batch["input_ids"].to(device)[held]
    return family.encoder_outputs({kind: features[feature_index[held_ids == family.token_ids[kind]]]
                                   for kind in KINDS if any(unit.kind == kind for unit in units)})
