"""Ascend NPU accelerator for Lightning (``accelerator="npu"``); torch-npu is imported only when used."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import MixedPrecision, Precision


def _torch_npu() -> Any:
    try:
        import torch_npu
    except ImportError as error:
        raise RuntimeError("accelerator='npu' needs torch-npu and Ascend's CANN runtime: "
                           "pip install 'lightning-dhp[npu]' on a machine with CANN installed") from error
    return torch_npu


class NPUAccelerator(Accelerator):
    """One Ascend NPU per process; the strategy pairs it with the HCCL backend."""

    def setup_device(self, device: torch.device) -> None:
        if device.type != "npu":
            raise ValueError(f"NPUAccelerator needs an npu device, got {device}")
        _torch_npu()
        torch.npu.set_device(device)

    def teardown(self) -> None:
        if self.is_available():
            torch.npu.empty_cache()

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return dict(torch.npu.memory_stats(device))

    @staticmethod
    def parse_devices(devices: int | str | list[int]) -> list[int]:
        if isinstance(devices, str):
            devices = -1 if devices.strip() in ("-1", "auto") else [int(d) for d in devices.split(",") if d.strip()]
        if devices == -1:
            return list(range(NPUAccelerator.auto_device_count()))
        if isinstance(devices, int):
            return list(range(devices))
        return list(devices)

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("npu", index) for index in NPUAccelerator.parse_devices(devices)]

    @staticmethod
    def auto_device_count() -> int:
        return torch.npu.device_count() if NPUAccelerator.is_available() else 0

    @staticmethod
    def is_available() -> bool:
        try:
            _torch_npu()
        except RuntimeError:
            return False
        return torch.npu.is_available()

    @staticmethod
    def name() -> str:
        return "npu"

    @classmethod
    def register_accelerators(cls, accelerator_registry: Any) -> None:
        accelerator_registry.register("npu", cls, description="Ascend NPU through torch-npu")


def npu_precision(plugin: Precision) -> Precision:
    """``plugin`` with its autocast on the NPU. Lightning builds mixed precision with ``torch.autocast("cuda")``
    for every accelerator but cpu and mps; on Ascend that autocast turns itself off, so "bf16-mixed" would
    silently train in float32 (and "16-mixed" would scale with a CUDA GradScaler)."""
    if isinstance(plugin, MixedPrecision) and plugin.device != "npu":
        return MixedPrecision(plugin.precision, device="npu")
    return plugin
