"""The NPU accelerator is registered and fails clearly where torch-npu (and CANN) are missing."""

from __future__ import annotations

import importlib.util

import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import AcceleratorRegistry

import lightning_dhp  # noqa: F401  (registers accelerator="npu")
from lightning_dhp.lightning import NPUAccelerator
from lightning_dhp.lightning.npu import _torch_npu

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch-npu is installed")


def test_npu_is_a_registered_accelerator_with_lightning():
    assert AcceleratorRegistry["npu"]["accelerator"] is NPUAccelerator


def test_without_torch_npu_the_accelerator_is_unavailable_and_says_how_to_get_it():
    assert not NPUAccelerator.is_available()
    assert NPUAccelerator.auto_device_count() == 0
    with pytest.raises(MisconfigurationException, match="NPUAccelerator"):
        Trainer(accelerator="npu", devices=1, logger=False)
    with pytest.raises(RuntimeError, match=r"lightning-dhp\[npu\]"):
        _torch_npu()


def test_device_lists_parse_like_lightnings():
    assert NPUAccelerator.parse_devices(2) == [0, 1]
    assert NPUAccelerator.parse_devices("0,3") == [0, 3]
    assert NPUAccelerator.parse_devices([1]) == [1]


def test_mixed_precision_autocasts_on_the_npu_not_on_cuda():
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from lightning_dhp.lightning.npu import npu_precision

    lightnings_choice = MixedPrecision("bf16-mixed", device="cuda")  # what Lightning builds for accelerator="npu"
    fixed = npu_precision(lightnings_choice)
    assert isinstance(fixed, MixedPrecision) and (fixed.device, fixed.precision) == ("npu", "bf16-mixed")
    assert fixed.scaler is None
    plain = Precision()
    assert npu_precision(plain) is plain
