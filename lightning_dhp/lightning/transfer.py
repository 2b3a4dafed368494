"""A loader worker's batch reaches its rank in one shared-memory buffer, not one per tensor.

A DataLoader worker puts each batch on a multiprocessing queue, and torch shares every tensor's storage as a
file descriptor of its own. The rank then fetches each descriptor from the worker over a socket, a round trip
that waits until the worker's process gets a core. A DHP step holds every round's tensors (tens of them), so
where ranks and workers share the cores those round trips were most of the step's wait for its batch: the main
job on 2 cores waited 295 ms (median) per step for batches that its worker had finished seconds before.

Here a step's tensors go into one shared-memory byte buffer, which torch sends as one descriptor; the rank
reads them back as views of that buffer. The rest of the step is pickled as usual. Only the queue between
processes uses this (:meth:`~multiprocessing.reduction.ForkingPickler.register`): other pickling of the step is
unchanged, and without workers nothing is pickled at all.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

_ALIGNMENT = 64  # bytes: every tensor starts at a multiple, so each dtype's view of the buffer is aligned


@dataclass(frozen=True)
class _TensorSpec:
    offset: int  # bytes into the buffer
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool


class _TensorsAside(pickle.Pickler):
    """Pickles an object with its dense CPU tensors left out (kept in ``tensors``, in order); any other tensor
    (a subclass, sparse, on a device) pickles as usual."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []

    def persistent_id(self, obj: Any) -> int | None:
        if type(obj) is torch.Tensor and obj.layout is torch.strided and obj.device.type == "cpu":
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _TensorsFromBuffer(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, buffer: torch.Tensor | None, specs: list[_TensorSpec]) -> None:
        super().__init__(file)
        self.buffer, self.specs = buffer, specs

    def persistent_load(self, pid: int) -> torch.Tensor:
        spec = self.specs[pid]
        tensor = _view(self.buffer, spec)
        return tensor.detach().requires_grad_() if spec.requires_grad else tensor


def _view(buffer: torch.Tensor, spec: _TensorSpec) -> torch.Tensor:
    """The tensor ``spec`` describes, as a view of ``buffer``."""
    size = spec.dtype.itemsize * math.prod(spec.shape)
    return buffer[spec.offset:spec.offset + size].view(spec.dtype).view(spec.shape)


def _packed(obj: Any) -> tuple[bytes, torch.Tensor | None, list[_TensorSpec]]:
    """``obj`` pickled without its tensors, the tensors' bytes in one shared-memory buffer (None without
    tensors), and where each lies."""
    file = io.BytesIO()
    pickler = _TensorsAside(file)
    pickler.dump(obj)
    if not pickler.tensors:
        return file.getvalue(), None, []
    specs, offset = [], 0
    for tensor in pickler.tensors:
        specs.append(_TensorSpec(offset, tensor.dtype, tuple(tensor.shape), tensor.requires_grad))
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGNMENT) * _ALIGNMENT
    buffer = torch.empty(max(offset, 1), dtype=torch.uint8).share_memory_()  # torch sends shared storage as is
    for tensor, spec in zip(pickler.tensors, specs, strict=True):
        _view(buffer, spec).copy_(tensor.detach())
    return file.getvalue(), buffer, specs


def _unpacked(payload: bytes, buffer: torch.Tensor | None, specs: list[_TensorSpec]) -> Any:
    return _TensorsFromBuffer(io.BytesIO(payload), buffer, specs).load()


def _reduce(obj: Any) -> tuple[Any, tuple[bytes, torch.Tensor | None, list[_TensorSpec]]]:
    return _unpacked, _packed(obj)


def send_in_one_buffer(cls: type) -> type:
    """Class decorator: objects of exactly ``cls`` cross between processes with their tensors in one buffer."""
    ForkingPickler.register(cls, _reduce)
    return cls
