"""The VLM fine-tuning application (Hydra entry point ``dhp-vlm-finetune``)."""

from lightning_dhp.app.main import main

__all__ = ["main"]
