"""What is simulated: the run's settings, the DHP paper's presets, and the error bad input raises."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_dhp.planner import CostModel
from lightning_dhp.planner.presets import MODEL_PRESETS, VISION_PRESETS
from lightning_dhp.simulate.policies import ULYSSES_VOLUME_RATIO

DEFAULT_DEVICES = (8, 16, 32, 64, 128, 256, 512, 1024)


class SimulationError(ValueError):
    """Bad simulator input; the message names the argument or file, the limit and the fix."""


@dataclass(frozen=True)
class SimulationConfig:
    """What is simulated; every field is a CLI option of the same name."""

    devices: tuple[int, ...] = DEFAULT_DEVICES
    samples_per_device: int = 8
    tokens_per_device: int = 16384
    vision_patches_per_device: int | None = None  # None: the vision tower's memory is not budgeted
    node_size: int = 8
    steps: int = 32
    pool_size: int = 32
    ulysses_heads: int = 8
    ulysses_volume_ratio: float = ULYSSES_VOLUME_RATIO
    seed: int = 0


@dataclass(frozen=True)
class Preset:
    """The DHP paper's setting: a VLM's language model (:data:`~lightning_dhp.planner.presets.MODEL_PRESETS`)
    on a device (:data:`~lightning_dhp.planner.presets.DEVICE_PRESETS`), its per-device token budget, and
    video length distributions.

    The budgets are assumptions (the activation memory left after ZeRO-sharded weights and optimizer
    states on 64-80 GB devices): 32768 tokens for the 2B model, 16384 for the 7-8B ones. Set
    ``--tokens-per-device`` from your own memory profile. The vision tower is modelled only in the
    ``-vision-`` presets (:data:`~lightning_dhp.planner.presets.VISION_PRESETS`), whose videos carry
    vision patches and are mixed with text samples. No preset budgets the tower's activations: the token
    budget is already assumed to fill the activation memory, and how a run splits it between tower and
    language model (checkpointing, freeing the tower's activations) is its own; pass
    ``--vision-patches-per-device`` from your memory profile.
    """

    name: str
    model: str
    device: str
    tokens_per_device: int
    distributions: tuple[str, ...] = ("activitynet", "epic_kitchens_videos")
    vision: bool = False

    def cost_model(self) -> CostModel:
        vision = VISION_PRESETS[self.model] if self.vision else None
        return CostModel.for_transformer(MODEL_PRESETS[self.model], vision=vision, device=self.device)

    def ulysses(self) -> tuple[int, float]:
        """Ulysses degrees divide the KV heads; its all-to-all moves q, k, v, out and their gradients,
        ``2 (2 heads + 2 kv_heads)`` head vectors per token and layer, against the ring's ``6 kv_heads``."""
        shape = MODEL_PRESETS[self.model]
        return shape.kv_heads, 2 * (2 * shape.heads + 2 * shape.kv_heads) / (6 * shape.kv_heads)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        *(
            Preset(f"{model}-{device_key}", model, device, 32768 if model == "internvl3-2b" else 16384)
            for model in MODEL_PRESETS
            for device_key, device in (("910b", "Ascend 910B"), ("h100", "H100"))
        ),
        *(
            Preset(f"{model}-vision-h100", model, "H100", 16384, ("activitynet+mooncake", "activitynet+azure_conv"),
                   vision=True)
            for model in ("qwen2.5-vl-7b", "internvl3-8b")
        ),
    )
}
