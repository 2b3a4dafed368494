"""Cost models from a transformer's dimensions and a device's datasheet (see :meth:`CostModel.for_transformer`).

Per token of a decoder with ``layers`` layers, hidden size ``h``, ``kv_dim = kv_heads x head_dim``,
MLP width ``I`` (gated: three matrices) and vocabulary ``V``, training (forward + backward = 3x
the forward FLOPs) costs:

- linear work: ``6 x P`` FLOPs, ``P = layers (2 h^2 + 2 h kv_dim + 3 h I) + h V`` the weights a
  token multiplies (Q and O are ``h x h``; K and V ``h x kv_dim``; the LM head ``h x V``);
- causal attention: ``QK^T`` and ``AV`` take ``4 h`` FLOPs per (query, key) pair per layer, a
  causal sample of ``L`` tokens has ``L^2 / 2`` pairs, so ``3 x 2 h layers x L^2`` FLOPs;
- ring traffic: K and V forward, K, V, dK and dV backward: ``3 x 2 x kv_dim x dtype_bytes x
  layers`` bytes per token.

Per vision patch (one ViT input token: ``temporal_patch x patch x patch`` pixels) of a VLM's vision
tower with ``depth`` blocks of width ``w``, MLP width ``I`` (gated: three matrices), ``m x m`` patches
merged into one visual token by a two-layer projector to the language model's width ``h_out``
(:class:`VisionShape`), training costs ``6 x W`` FLOPs with

    W = channels x temporal_patch x patch^2 x w                    # patch embedding
      + depth (4 w^2 + (3 if gated else 2) w I)                    # QKV, output projection, MLP
      + (w m^2 x merger_hidden + merger_hidden x h_out) / m^2      # projector, once per m^2 patches

(``merger_hidden`` is ``w m^2`` in Qwen2-VL's PatchMerger, ``h_out`` in InternVL's and LLaVA's
projectors). Attention inside the tower is left out: per patch and block it costs ``4 w x span``
FLOPs (``span``: the patches one attends to) against ``2 (4 w^2 + 3 w I)``, about 1% in Qwen2.5-VL
(windows of 64 patches in 28 of 32 blocks, one frame in the other 4) but about 17% in InternViT-300M
(full attention over a 448x448 tile of 1025 tokens), which this model therefore underestimates. A
frozen tower costs only its forward, a third of this.

Seconds are FLOPs over ``peak x utilisation`` and bytes over ``bandwidth x`` :data:`LINK_EFFICIENCY`.
For a Llama-7B-like shape with 8 KV heads on an H100 this reproduces :meth:`CostModel.default`'s
attention, linear, K/V, overhead and latency terms within 10%; the default's bandwidths (100 and
25 GB/s) are more conservative than the H100 preset's. The vision tower runs at the language model's
utilisation (an assumption: its matrices are smaller, so it may reach less).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Collectives reach about 80% of a link's nominal rate (nccl-tests bus bandwidth on NVLink and
# InfiniBand systems is typically 75-85% of the link rate): applied to every preset's bandwidth.
LINK_EFFICIENCY = 0.8
# Fixed cost of one micro-step per layer (kernel launches, per-layer bookkeeping of forward and
# backward): a modelling assumption, 0.15 ms per layer, i.e. about 5 ms for 32 layers as in
# CostModel.default(). Profile the real model (DHPStrategy(cost_model="profile")) to replace it.
OVERHEAD_S_PER_LAYER = 1.5e-4


@dataclass(frozen=True)
class DevicePreset:
    """One accelerator: dense bf16 peak, achievable utilisation, bandwidths, per-step ring latency."""

    name: str
    peak_bf16_flops: float
    utilisation: float
    intra_node_bytes_per_s: float  # one direction, to one peer
    inter_node_bytes_per_s: float  # one direction, per device
    ring_step_latency_s: float  # one send/recv step of one layer (forward or backward)


DEVICE_PRESETS: dict[str, DevicePreset] = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1979 with sparsity); NVLink 4 900 GB/s
    # total = 450 GB/s per direction through NVSwitch; one 400 Gb/s NDR InfiniBand NIC per GPU
    # (DGX H100) = 50 GB/s. Utilisation 0.40: Megatron-LM reports 38-47% MFU on H100 for GPT
    # models of 7-175B (NVIDIA Megatron-Core performance tables). Ring step ~15 us (NVLink p2p).
    "H100": DevicePreset("H100", 989e12, 0.40, 450e9, 50e9, 15e-6),
    # NVIDIA H200 SXM datasheet: the H100's compute (989 TFLOP/s dense BF16) with 141 GB HBM3e at
    # 4.8 TB/s; NVLink 900 GB/s total; 400 Gb/s NIC per GPU (DGX H200). Utilisation 0.42: the faster
    # memory helps the memory-bound kernels a little (assumption, between H100 and A100 figures).
    "H200": DevicePreset("H200", 989e12, 0.42, 450e9, 50e9, 15e-6),
    # NVIDIA A100 SXM4 datasheet: 312 TFLOP/s dense BF16; NVLink 3 600 GB/s total = 300 GB/s per
    # direction; one 200 Gb/s HDR NIC per GPU (DGX A100) = 25 GB/s. Utilisation 0.50: Narayanan et
    # al. 2021 (Megatron-LM on A100, SC'21) sustain 44-52% of peak. Ring step ~20 us.
    "A100": DevicePreset("A100", 312e12, 0.50, 300e9, 25e9, 20e-6),
    # Huawei Ascend 910B (Atlas 800T A2 spec sheet): 313 TFLOP/s FP16/BF16; 8 NPUs in a full HCCS
    # mesh, 7 links x 56 GB/s, so one peer gets one 56 GB/s link; 200 Gb/s RoCE per NPU = 25 GB/s.
    # Utilisation 0.35: an assumption (MindSpeed does not publish MFU tables); ring step ~25 us.
    "Ascend 910B": DevicePreset("Ascend 910B", 313e12, 0.35, 56e9, 25e9, 25e-6),
}


@dataclass(frozen=True)
class TransformerShape:
    """A decoder's dimensions (the language model of a VLM; its vision tower is a :class:`VisionShape`)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None  # default hidden // heads
    gated_mlp: bool = True  # SwiGLU-style: gate, up and down matrices

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerShape.{name}={value!r} must be an integer >= 1")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def matmul_weights_per_token(self) -> int:
        """Weights one token multiplies: attention projections, MLP and the LM head."""
        h = self.hidden
        q_dim = self.heads * (self.head_dim or h // self.heads)
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate
        return self.layers * (2 * h * q_dim + 2 * h * self.kv_dim + mlp) + h * self.vocab

    @classmethod
    def from_config(cls, config: Any) -> TransformerShape:
        """From a Hugging Face config object or dict (its ``text_config``/``llm_config`` for VLMs)."""
        get = _getter(config)
        for nested in ("text_config", "llm_config"):
            inner = get(nested)
            if inner is not None:
                return cls.from_config(inner)
        missing = [key for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                                   "vocab_size") if get(key) is None]
        if missing:
            raise ValueError(f"the model config lacks {missing}; pass the dimensions to for_transformer() instead")
        heads = int(get("num_attention_heads"))
        head_dim = get("head_dim")
        return cls(
            layers=int(get("num_hidden_layers")),
            hidden=int(get("hidden_size")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            intermediate=int(get("intermediate_size")),
            vocab=int(get("vocab_size")),
            head_dim=int(head_dim) if head_dim else None,
        )


# The language models of the DHP paper's setting (their Hugging Face config.json files).
MODEL_PRESETS: dict[str, TransformerShape] = {
    # InternVL3-2B: Qwen2.5-1.5B language model (vocabulary extended to 151674)
    "internvl3-2b": TransformerShape(layers=28, hidden=1536, heads=12, kv_heads=2, intermediate=8960, vocab=151674),
    # InternVL3-8B: Qwen2.5-7B language model (vocabulary 151674)
    "internvl3-8b": TransformerShape(layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=151674),
    # Qwen2.5-VL-7B-Instruct text model
    "qwen2.5-vl-7b": TransformerShape(layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064),
}


def _getter(config: Any) -> Callable[..., Any]:
    """``get(key, default=None)`` of a Hugging Face config object or dict."""
    return config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)


@dataclass(frozen=True)
class VisionShape:
    """A VLM's vision tower: a ViT of ``depth`` blocks and a projector to the language model's width.

    Its attention heads do not change its FLOPs, so they are not part of it (see the module docstring).
    """

    depth: int
    hidden: int
    intermediate: int
    out_hidden: int  # the language model's hidden size: the projector's output
    patch_size: int = 14
    temporal_patch_size: int = 1  # frames in one patch (Qwen2-VL: 2; InternViT: 1)
    in_channels: int = 3
    merge_size: int = 1  # merge_size x merge_size patches become one visual token
    gated_mlp: bool = False  # SwiGLU-style MLP (Qwen2.5-VL)
    merger_hidden: int | None = None  # the projector's inner width; default hidden x merge_size^2 (Qwen2-VL)

    def __post_init__(self) -> None:
        for name in ("depth", "hidden", "intermediate", "out_hidden", "patch_size", "temporal_patch_size",
                     "in_channels", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VisionShape.{name}={value!r} must be an integer >= 1")

    @property
    def weights_per_patch(self) -> float:
        """Weights one patch multiplies: its share of the patch embedding, the blocks and the projector."""
        width, merged = self.hidden, self.hidden * self.merge_size**2
        embedding = self.in_channels * self.temporal_patch_size * self.patch_size**2 * width
        block = 4 * width * width + (3 if self.gated_mlp else 2) * width * self.intermediate
        inner = self.merger_hidden or merged
        projector = merged * inner + inner * self.out_hidden
        return embedding + self.depth * block + projector / self.merge_size**2

    @classmethod
    def from_config(cls, config: Any) -> VisionShape | None:
        """The tower of a Hugging Face VLM config (object or dict), or None when it has no ``vision_config``.

        Qwen2-VL / Qwen2.5-VL towers (``depth``, ``hidden_size`` or ``embed_dim``, ``intermediate_size``
        or ``mlp_ratio``, ``patch_size``, ``temporal_patch_size``, ``in_channels``/``in_chans``,
        ``spatial_merge_size``, ``out_hidden_size``, or Qwen2-VL's ``hidden_size`` beside ``embed_dim``)
        and InternVL/LLaVA-style ones (``num_hidden_layers``, ``hidden_size``, ``intermediate_size``,
        ``patch_size``, ``num_channels``, the top-level ``downsample_ratio``; the projector ends at the
        language model's width). The MLP is gated when ``hidden_act`` is ``silu`` (Qwen2.5-VL).
        """
        vision = _getter(config)("vision_config")
        if vision is None:
            return None
        get = _getter(vision)
        width = get("embed_dim") or get("hidden_size")
        if get("depth") is not None:  # Qwen2-VL family: the tower ends in its PatchMerger
            depth, merge_size, merger_hidden = get("depth"), get("spatial_merge_size", 1), None
            out_hidden = get("hidden_size") if get("embed_dim") else get("out_hidden_size")
        else:  # InternVL / LLaVA: pixel shuffle (downsample_ratio), then an MLP projector at the LM's width
            ratio = _getter(config)("downsample_ratio")
            depth, merge_size = get("num_hidden_layers"), round(1 / ratio) if ratio else 1
            out_hidden = merger_hidden = TransformerShape.from_config(config).hidden
        patch_size = get("patch_size")
        if isinstance(patch_size, (list, tuple)):  # InternVL's [height, width]; square in every released tower
            patch_size = patch_size[0]
        mlp_ratio = get("mlp_ratio")
        intermediate = get("intermediate_size") or (round(width * mlp_ratio) if width and mlp_ratio else None)
        found = {"depth": depth, "hidden_size": width, "intermediate_size": intermediate, "out_hidden_size": out_hidden,
                 "patch_size": patch_size}
        missing = sorted(key for key, value in found.items() if value is None)
        if missing:
            raise ValueError(f"the vision_config lacks {missing}; pass vision=VisionShape(...) to for_transformer(), "
                             f"or pass the text_config alone to leave the vision tower out")
        return cls(
            depth=int(depth),
            hidden=int(width),
            intermediate=int(intermediate),
            out_hidden=int(out_hidden),
            patch_size=int(patch_size),
            temporal_patch_size=int(get("temporal_patch_size") or 1),
            in_channels=int(get("in_channels") or get("in_chans") or get("num_channels") or 3),
            merge_size=int(merge_size),
            gated_mlp=get("hidden_act") == "silu",
            merger_hidden=merger_hidden,
        )


# The vision towers of the language models above (their Hugging Face config.json files).
VISION_PRESETS: dict[str, VisionShape] = {
    # InternVL3-2B/8B: InternViT-300M-448px-V2.5 (24 blocks, width 1024, MLP 4096, GELU), 448x448 tiles of
    # 14-pixel patches, pixel shuffle 0.5 (2x2 patches per token: 256 tokens per tile), projector mlp1 =
    # LayerNorm, Linear(4096, h_out), GELU, Linear(h_out, h_out) at the language model's width h_out
    "internvl3-2b": VisionShape(depth=24, hidden=1024, intermediate=4096, out_hidden=1536, merge_size=2,
                                merger_hidden=1536),
    "internvl3-8b": VisionShape(depth=24, hidden=1024, intermediate=4096, out_hidden=3584, merge_size=2,
                                merger_hidden=3584),
    # Qwen2.5-VL-7B-Instruct vision_config: depth 32, hidden 1280, intermediate 3420 (SwiGLU, hidden_act
    # silu), 16 heads, patch 14, temporal patch 2, in_chans 3, spatial merge 2, out_hidden 3584
    "qwen2.5-vl-7b": VisionShape(depth=32, hidden=1280, intermediate=3420, out_hidden=3584, temporal_patch_size=2,
                                 merge_size=2, gated_mlp=True),
}


def device_preset(device: str | DevicePreset) -> DevicePreset:
    """A preset by name (case-insensitive, e.g. ``"h100"``, ``"ascend 910b"``, ``"910b"``) or itself."""
    if isinstance(device, DevicePreset):
        return device
    wanted = device.lower().replace("ascend", "").replace("-", "").replace("_", "").replace(" ", "")
    for name, preset in DEVICE_PRESETS.items():
        if name.lower().replace("ascend", "").replace(" ", "") == wanted:
            return preset
    raise ValueError(f"unknown device {device!r}; use one of {sorted(DEVICE_PRESETS)} or a DevicePreset")


def transformer_coefficients(shape: TransformerShape, device: DevicePreset, dtype_bytes: int = 2) -> dict[str, float]:
    """The CostModel fields (except ``comm_overlap``) for ``shape`` trained on ``device``."""
    flops_per_s = device.peak_bf16_flops * device.utilisation
    return {
        "attention_s_per_token2": 3 * 2 * shape.hidden * shape.layers / flops_per_s,
        "linear_s_per_token": 6 * shape.matmul_weights_per_token / flops_per_s,
        "overhead_s": OVERHEAD_S_PER_LAYER * shape.layers,
        "ring_step_latency_s": 2 * shape.layers * device.ring_step_latency_s,  # forward and backward steps
        "kv_bytes_per_token": float(3 * 2 * shape.kv_dim * dtype_bytes * shape.layers),
        "intra_node_bytes_per_s": device.intra_node_bytes_per_s * LINK_EFFICIENCY,
        "inter_node_bytes_per_s": device.inter_node_bytes_per_s * LINK_EFFICIENCY,
    }


def vision_s_per_patch(shape: VisionShape, device: DevicePreset) -> float:
    """Seconds per vision patch on ``device``, forward + backward: ``6 x`` :attr:`VisionShape.weights_per_patch`
    FLOPs."""
    return 6 * shape.weights_per_patch / (device.peak_bf16_flops * device.utilisation)
