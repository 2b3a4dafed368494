"""A loader worker's batch reaches its rank in one shared-memory buffer, not one per tensor.

A DataLoader worker puts each batch on a multiprocessing queue, and torch shares every tensor's storage as a
file descriptor of its own. The rank then fetches each descriptor from the worker over a socket, a round trip
that waits until the worker's process gets a core. A DHP step holds every round's tensors (about 220 per rank in
the main job), so where ranks and workers share the cores those round trips were most of the step's wait for its
batch: the main job on 2 cores waited 295 ms (median) per step for batches its worker had finished seconds before.

Here a step's tensors go into one shared-memory byte buffer, which torch sends as one descriptor; the rank
reads them back as views of that buffer. The rest of the step is pickled as usual. Only the queue between
processes uses this (:meth:`~multiprocessing.reduction.ForkingPickler.register`): other pickling of the step is
unchanged, and without workers nothing is pickled at all.
"""

from __future__ import annotations

import io
import math
import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

_ALIGNMENT = 64  # bytes: every tensor starts at a multiple, so each dtype's view of the buffer is aligned

# where a tensor lies in the buffer: (dtype, shape, contiguous strides, offset in elements of its dtype, requires
# grad); a plain tuple, as a step has hundreds of tensors to describe
_TensorSpec = tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int, bool]


class _TensorsAside(pickle.Pickler):
    """Pickles an object with its dense CPU tensors left out (kept in ``tensors``, in order); any other tensor
    (a subclass, sparse, on a device) pickles as usual. A tensor inside an autograd graph is refused, as torch
    refuses it between processes: the rank would get a leaf cut off from that graph."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []

    def persistent_id(self, obj: Any) -> int | None:
        if type(obj) is torch.Tensor and obj.layout is torch.strided and obj.device.type == "cpu":
            if obj.grad_fn is not None:
                raise RuntimeError(
                    f"a DHP step from a DataLoader worker holds a tensor of shape {tuple(obj.shape)} computed with "
                    "autograd (it requires grad and is not a leaf); autograd cannot cross between processes. Detach "
                    "it in the dataset or collate function (tensor.detach()), or compute it in the training step"
                )
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _TensorsFromBuffer(pickle.Unpickler):
    """Unpickles what :class:`_TensorsAside` pickled, each tensor a view of the buffer: one ``as_strided`` of the
    buffer seen as its dtype."""

    def __init__(self, file: io.BytesIO, buffer: torch.Tensor | None, specs: list[_TensorSpec]) -> None:
        super().__init__(file)
        self.specs = specs
        self.as_dtype = {} if buffer is None else _buffer_as_dtypes(buffer, specs)

    def persistent_load(self, pid: int) -> torch.Tensor:
        dtype, shape, stride, offset, requires_grad = self.specs[pid]
        tensor = self.as_dtype[dtype].as_strided(shape, stride, offset)
        return tensor.detach().requires_grad_() if requires_grad else tensor


def _buffer_as_dtypes(buffer: torch.Tensor, specs: list[_TensorSpec]) -> dict[torch.dtype, torch.Tensor]:
    """The buffer seen as each dtype its tensors have: one view per dtype, not per tensor."""
    return {dtype: buffer.view(dtype) for dtype in {spec[0] for spec in specs}}


def _packed(obj: Any) -> tuple[bytes, torch.Tensor | None, list[_TensorSpec]]:
    """``obj`` pickled without its tensors, the tensors' bytes in one shared-memory buffer (None without
    tensors), and where each lies."""
    file = io.BytesIO()
    pickler = _TensorsAside(file)
    pickler.dump(obj)
    if not pickler.tensors:
        return file.getvalue(), None, []
    specs: list[_TensorSpec] = []
    offset = 0  # bytes
    for tensor in pickler.tensors:
        shape, itemsize = tuple(tensor.shape), tensor.element_size()
        stride = tuple(math.prod(shape[dim + 1:]) for dim in range(len(shape)))
        specs.append((tensor.dtype, shape, stride, offset // itemsize, tensor.requires_grad))
        offset += -(-tensor.numel() * itemsize // _ALIGNMENT) * _ALIGNMENT
    buffer = torch.empty(max(offset, _ALIGNMENT), dtype=torch.uint8).share_memory_()  # torch sends it as is
    as_dtype = _buffer_as_dtypes(buffer, specs)
    with torch.no_grad():
        for tensor, (dtype, shape, stride, element_offset, _) in zip(pickler.tensors, specs, strict=True):
            as_dtype[dtype].as_strided(shape, stride, element_offset).copy_(tensor)
    return file.getvalue(), buffer, specs


def _unpacked(payload: bytes, buffer: torch.Tensor | None, specs: list[_TensorSpec]) -> Any:
    return _TensorsFromBuffer(io.BytesIO(payload), buffer, specs).load()


def _reduce(obj: Any) -> tuple[Any, tuple[bytes, torch.Tensor | None, list[_TensorSpec]]]:
    return _unpacked, _packed(obj)


def send_in_one_buffer(cls: type) -> type:
    """Class decorator: objects of exactly ``cls`` cross between processes with their tensors in one buffer."""
    ForkingPickler.register(cls, _reduce)
    return cls
