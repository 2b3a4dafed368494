"""A tiny vision-language model whose attention runs context-parallel through ``cp_attention``.

- Vision encoder: a linear patch embedding with learned row/column embeddings (any frame size up to
  ``max_patches_per_side`` patches a side), then bidirectional pre-norm transformer blocks. Frames of
  different sizes are packed into one varlen batch; attention stays inside each frame.
- Projector: a two-layer MLP from vision features into the decoder's embedding space.
- Decoder: LLaMA-style (RMSNorm, RoPE from ``position_ids``, SwiGLU, grouped-query attention). Its
  attention calls ``cp_attention(q, k, v)`` without a layout: the running CP context decides which
  rows attend to which, at any degree, 1 included.

Visual tokens sit in the text sequence as ``<image>`` placeholders; ``visual_index`` says which visual
token of its sample a row holds (0 for text). A rank encodes only the frames with at least one visual
token among its own rows and keeps only those rows' features, so summed over the ranks of a group the
encoder's gradient arrives exactly once per visual token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dhp.attention import ZigzagLayout, cp_attention
from lightning_dhp.data.video_digits import VOCAB


@dataclass
class TinyVLMConfig:
    """Sizes of :class:`TinyVLM`; the defaults train on a few CPU processes in minutes."""

    vocab_size: int = len(VOCAB)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    image_channels: int = 3
    patch_size: int = 8
    max_patches_per_side: int = 16
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 128

    def __post_init__(self) -> None:
        for name, heads, width in (
            ("num_heads", self.num_heads, self.hidden_size),
            ("vision_heads", self.vision_heads, self.vision_hidden_size),
        ):
            if width % heads or (width // heads) % 2:
                raise ValueError(
                    f"{name}={heads} must split the hidden size {width} into heads of even "
                    f"size (RoPE rotates pairs); pick a divisor of {width}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                f"(grouped-query attention shares each KV head across a group of query heads)"
            )


class VisionBlock(nn.Module):
    """Pre-norm transformer block with bidirectional attention inside each frame."""

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        width = config.vision_hidden_size
        self.num_heads = config.vision_heads
        self.head_dim = width // config.vision_heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.vision_intermediate_size),
            nn.GELU(),
            nn.Linear(config.vision_intermediate_size, width),
        )

    def forward(self, x: torch.Tensor, frames: ZigzagLayout) -> torch.Tensor:
        q, k, v = self.qkv(self.attention_norm(x)).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        attended = cp_attention(q, k, v, layout=frames, causal=False)
        x = x + self.out(attended.flatten(1))
        return x + self.mlp(self.mlp_norm(x))


class VisionEncoder(nn.Module):
    """Patch embedding plus bidirectional blocks over a list of (C, H, W) frames of any size."""

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.max_patches_per_side = config.max_patches_per_side
        width = config.vision_hidden_size
        self.patch_embed = nn.Linear(config.image_channels * config.patch_size**2, width)
        self.row_embed = nn.Embedding(config.max_patches_per_side, width)
        self.col_embed = nn.Embedding(config.max_patches_per_side, width)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.vision_layers))
        self.norm = nn.LayerNorm(width)

    def patch_grid(self, frame: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of patches of ``frame``; raises if the frame does not tile or is too big."""
        height, width = frame.shape[-2:]
        rows, cols = height // self.patch_size, width // self.patch_size
        if height % self.patch_size or width % self.patch_size or max(rows, cols) > self.max_patches_per_side:
            raise ValueError(
                f"frame of {height}x{width} px does not fit the vision encoder: sides must be multiples "
                f"of patch_size={self.patch_size} and at most {self.max_patches_per_side * self.patch_size} "
                f"px (max_patches_per_side={self.max_patches_per_side}); resize the frame or enlarge the config"
            )
        return rows, cols

    def forward(self, frames: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features of every patch of every frame, packed frame after frame in row-major patch order.

        No frames is a pass over zero patches: every parameter still takes part (with zero gradients),
        so every rank runs the same modules in every round (sharded modules gather on every rank).
        """
        dtype = self.patch_embed.weight.dtype
        patch_dim = self.patch_embed.in_features
        patches, rows, cols, patch_counts = [torch.empty(0, patch_dim, dtype=dtype)], [], [], []
        for frame in frames:
            grid_rows, grid_cols = self.patch_grid(frame)
            size = self.patch_size
            patches.append(
                frame.to(dtype)
                .reshape(-1, grid_rows, size, grid_cols, size)
                .permute(1, 3, 0, 2, 4)
                .reshape(grid_rows * grid_cols, -1)
            )
            rows.append(torch.arange(grid_rows).repeat_interleave(grid_cols))
            cols.append(torch.arange(grid_cols).repeat(grid_rows))
            patch_counts.append(grid_rows * grid_cols)
        device = self.patch_embed.weight.device
        no_index = torch.empty(0, dtype=torch.long)
        x = (
            self.patch_embed(torch.cat(patches).to(device))
            + self.row_embed(torch.cat([no_index, *rows]).to(device))
            + self.col_embed(torch.cat([no_index, *cols]).to(device))
        )
        layout = ZigzagLayout(patch_counts, 1, 0)
        for block in self.blocks:
            x = block(x, layout)
        return self.norm(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (T, H, D) with per-row angles given as cos/sin (T, D/2)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class DecoderAttention(nn.Module):
    """Grouped-query causal self-attention over the packed rows of the current CP context."""

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q = rotate(self.q_proj(x).view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = rotate(self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        return self.o_proj(cp_attention(q, k, v).flatten(1))


class SwiGLU(nn.Module):
    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attention = DecoderAttention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TinyVLM(nn.Module):
    """Vision encoder + projector + LLaMA-style decoder over one rank's packed (THD) rows."""

    def __init__(self, config: TinyVLMConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TinyVLMConfig()
        self.vision = VisionEncoder(config)
        self.projector = nn.Sequential(
            nn.Linear(config.vision_hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_dim = config.hidden_size // config.num_heads
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the whole model as built: the rotary frequencies and GPT-2 style weights (DHPStrategy
        calls it to materialise a model built on the meta device)."""
        head_dim = 2 * len(self.inv_freq)
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=self.inv_freq.device) / head_dim
        with torch.no_grad():
            self.inv_freq.copy_(self.config.rope_theta ** -exponents)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 style: small normal weights; PyTorch's N(0, 1) embeddings drown the projected features.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visual_index: torch.Tensor,
        sequence_ids: torch.Tensor,
        pixel_values: Sequence[Sequence[torch.Tensor]],
    ) -> torch.Tensor:
        """Logits (T, vocab) of this rank's rows.

        ``visual_index[t]`` is 1 + the index of the visual token row ``t`` holds within its sample
        (0 for text and padding); ``sequence_ids[t]`` is the row's sample in the group;
        ``pixel_values[s]`` holds the frames of sample ``s``, whose patches in order are its visual tokens.
        """
        hidden = self.embed_tokens(input_ids)
        rows, features = self.visual_features(visual_index, sequence_ids, pixel_values)
        hidden = hidden.index_copy(0, rows, features.to(hidden.dtype))
        angles = position_ids.to(self.inv_freq)[:, None] * self.inv_freq
        cos, sin = angles.cos().to(hidden.dtype), angles.sin().to(hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        return self.lm_head(self.norm(hidden))

    def visual_features(
        self,
        visual_index: torch.Tensor,
        sequence_ids: torch.Tensor,
        pixel_values: Sequence[Sequence[torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, projected features) of the visual rows, encoding only frames these rows need."""
        rows = torch.nonzero(visual_index > 0).flatten()
        if rows.numel() == 0:  # a zero-frame pass: the vision tower runs on every rank in every round
            return rows, self.projector(self.vision([]))
        samples = sequence_ids.to(rows.device)[rows]
        tokens = visual_index[rows] - 1
        frames_to_encode: list[torch.Tensor] = []
        encoded_rows = torch.empty_like(tokens)  # row of each visual token in the encoder's output
        encoded = 0
        for sample in samples.unique().tolist():
            frames = pixel_values[sample]
            patch_counts = torch.tensor(
                [grid_rows * grid_cols for grid_rows, grid_cols in map(self.vision.patch_grid, frames)],
                dtype=torch.long,
                device=tokens.device,
            )
            frame_ends = patch_counts.cumsum(0)
            mine = samples == sample
            sample_tokens = tokens[mine]
            if int(sample_tokens.max()) >= int(patch_counts.sum()):
                raise ValueError(
                    f"sample {sample} of the group has visual token {int(sample_tokens.max())} but its "
                    f"{len(frames)} frame(s) hold only {int(patch_counts.sum())} patches; the number of "
                    f"<image> tokens must equal the total patch count of the sample's frames"
                )
            frame_of_token = torch.searchsorted(frame_ends, sample_tokens, right=True)
            used = frame_of_token.unique()
            used_ends = encoded + patch_counts[used].cumsum(0)
            encoded_start = torch.zeros_like(patch_counts)
            encoded_start[used] = used_ends - patch_counts[used]
            frame_start = frame_ends - patch_counts
            encoded_rows[mine] = encoded_start[frame_of_token] + sample_tokens - frame_start[frame_of_token]
            frames_to_encode.extend(frames[frame] for frame in used.tolist())
            encoded = int(used_ends[-1])
        features = self.vision(frames_to_encode)[encoded_rows]
        return rows, self.projector(features)
