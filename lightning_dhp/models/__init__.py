"""Reference models for examples, tests and benchmarks: the tiny VLM and its LightningModule."""

from lightning_dhp.models.tiny_vlm import TinyVLM, TinyVLMConfig
from lightning_dhp.models.vlm_task import VLMTask, answer_accuracy, fit_single_process, single_process_batch

__all__ = ["TinyVLM", "TinyVLMConfig", "VLMTask", "answer_accuracy", "fit_single_process", "single_process_batch"]
