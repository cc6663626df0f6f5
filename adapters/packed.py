"""An adapter's tensors in one flat buffer, a view per name made on access.

Why: an RLRR task is ~200 small vectors (ViT-S: 198 tensors, 0.7 MiB). Kept as separate tensors,
each costs ~740 B of bookkeeping (TensorImpl, storage, Python object) and a heap allocation of its
own: +40% resident memory over the data for ViT-S, measured with 50 loaded tasks
(bench/README.md). Packed, a served task costs its bytes plus one buffer, and the tasks of one
batch can be stacked with a single copy (`MultiTaskViT`).

The head is kept beside the buffer (its shape differs per task), so every task trained with the
same config on the same backbone has the same body layout, and that layout object is shared.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open

from .names import HEAD_NAMES

__all__ = ["PackedTensors", "SEPARATE", "shape_of"]

SEPARATE = HEAD_NAMES  # kept as their own tensors: their shapes differ per task
_Layout = dict[str, tuple[int, int, torch.Size]]  # name -> (offset, numel, shape) in the flat buffer
_LAYOUTS: dict[tuple, _Layout] = {}  # interned: one object per distinct (names, shapes)
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _layout(items: list[tuple[str, torch.Size]]) -> _Layout:
    key = tuple(items)
    found = _LAYOUTS.get(key)
    if found is None:
        found, offset = {}, 0
        for name, shape in items:
            numel = shape.numel()
            found[name] = (offset, numel, shape)
            offset += numel
        _LAYOUTS[key] = found
    return found


class PackedTensors(Mapping[str, torch.Tensor]):
    """Read-mostly mapping name -> tensor, backed by one 1-D buffer (+ the separate head tensors).

    Values are views of the buffer: cheap to make (~2 µs), never copies. Build with `pack`.

    Args:
        flat: The 1-D buffer holding every body tensor.
        layout: Name -> (offset, numel, shape) in `flat`; shared between tasks of one layout.
        separate: Tensors kept outside the buffer (the head).
    """

    __slots__ = ("flat", "layout", "separate")

    def __init__(self, flat: torch.Tensor, layout: _Layout, separate: dict[str, torch.Tensor]) -> None:
        self.flat, self.layout, self.separate = flat, layout, separate

    @classmethod
    def pack(cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> PackedTensors:
        """Copy tensors into one buffer (detached; same dtype if they share one, else float32).

        Args:
            tensors: Name -> tensor (an adapter's state).
            device: Where the buffer lives; the first body tensor's device when None.
            dtype: Buffer dtype; see above when None.
        """
        body = sorted(k for k in tensors if k not in SEPARATE)
        dtypes = {tensors[k].dtype for k in body}
        dtype = dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
        device = device or (tensors[body[0]].device if body else "cpu")
        layout = _layout([(k, tensors[k].shape) for k in body])
        flat = torch.empty(sum(n for _, n, _ in layout.values()), dtype=dtype, device=device)
        for k, (offset, numel, _) in layout.items():
            flat[offset:offset + numel].copy_(tensors[k].detach().reshape(-1))
        separate = {k: tensors[k].detach().to(device, dtype) for k in SEPARATE if k in tensors}
        return cls(flat, layout, separate)

    @classmethod
    def load_file(cls, path: str | os.PathLike) -> PackedTensors:
        """Read a safetensors file straight into one buffer, one tensor at a time.

        Each tensor read is a temporary freed before the next is read, so loading a task leaves no
        ~200 small holes around its buffer: measured with 50 ViT-S tasks in the server, reading
        the whole file first and then packing kept 2.0x the data resident (heap fragmentation),
        this keeps ~1.0x (bench/README.md).

        Args:
            path: A safetensors file.

        Raises:
            SafetensorError, OSError, ValueError: As safetensors raises them for a bad file.
        """
        with safe_open(str(path), framework="pt") as f:  # validates the header (offsets, sizes) first
            names = list(f.keys())
            fast = _contiguous_body(path)
            if fast is not None:
                flat, layout = fast
                separate = {k: f.get_tensor(k).clone() for k in names if k not in layout}
                return cls(flat, layout, separate)
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            slices = {k: f.get_slice(k) for k in names}
            # Non-float tensors stay separate and unconverted, so validation still sees their dtype.
            body = sorted(k for k in names if k not in SEPARATE and slices[k].get_dtype() in _DTYPES)
            dtypes = {_DTYPES[slices[k].get_dtype()] for k in body}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            layout = _layout([(k, torch.Size(slices[k].get_shape())) for k in body])
            flat = torch.empty(sum(n for _, n, _ in layout.values()), dtype=dtype)
            for k, (offset, numel, _) in layout.items():
                flat[offset:offset + numel].copy_(f.get_tensor(k).reshape(-1))
            # clone: safetensors may hand out a tensor backed by the file's mapping, which would keep
            # the whole file resident as long as the head lives
            separate = {k: f.get_tensor(k).clone() for k in names if k not in layout}
        return cls(flat, layout, separate)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PackedTensors:
        """The same tensors on `device` in `dtype`; `self` when nothing changes (no copy).

        Args:
            device: Target device.
            dtype: Target dtype.
        """
        device = torch.device(device)
        if self.flat.device == device and self.flat.dtype == dtype and all(
                t.device == device and t.dtype == dtype for t in self.separate.values()):
            return self
        return PackedTensors(self.flat.to(device, dtype), self.layout,
                             {k: t.to(device, dtype) for k, t in self.separate.items()})

    def stacked_view(self, stacked: torch.Tensor, name: str) -> torch.Tensor:
        """`name` of U tasks at once, from their buffers stacked as (U, P) (same layout as self).

        Args:
            stacked: (U, P) rows of flat buffers that share this layout.
            name: A body tensor's name.
        """
        offset, numel, shape = self.layout[name]
        return stacked[:, offset:offset + numel].view(stacked.shape[0], *shape)  # (U, *shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        found = self.separate.get(name)
        if found is not None:
            return found
        offset, numel, shape = self.layout[name]  # KeyError for an unknown name, as a dict would
        return self.flat[offset:offset + numel].view(shape)

    def __contains__(self, name: object) -> bool:
        return name in self.separate or name in self.layout

    def __iter__(self) -> Iterator[str]:
        yield from self.layout
        yield from self.separate

    def __len__(self) -> int:
        return len(self.layout) + len(self.separate)

    def __repr__(self) -> str:
        return f"PackedTensors({len(self)} tensors, {self.flat.numel()} packed {self.flat.dtype} on {self.flat.device})"


def shape_of(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...] | None:
    """A tensor's shape (None: absent), from a PackedTensors' layout without making a view.

    Args:
        tensors: Any name -> tensor mapping.
        name: Tensor name.
    """
    if isinstance(tensors, PackedTensors):
        found = tensors.layout.get(name)
        if found is not None:
            return tuple(found[2])
    return tuple(tensors[name].shape) if name in tensors else None


def _contiguous_body(path: str | os.PathLike) -> tuple[torch.Tensor, _Layout] | None:
    """The body in a few reads, when the file stores it in the packed buffer's order; else None.

    `safetensors.torch.save_file` writes tensors of one dtype in name order, back to back: the
    layout `pack` builds, interrupted only by the head (its name sorts between `blocks.*` and
    `norm.*`). Then the buffer takes one `readinto` per run of adjacent tensors (2 for a task)
    instead of ~200 `get_tensor` calls plus copies (~50 of a ViT-S task's ~60 ms load). Any other
    arrangement (another writer, mixed dtypes) returns None and is read tensor by tensor. Call
    only after `safe_open` accepted the header (offsets within the file, no overlaps).
    """
    if sys.byteorder != "little":  # safetensors is little-endian; a raw read does not swap
        return None
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        body = sorted(k for k in header if k not in SEPARATE)
        dtypes = {header[k]["dtype"] for k in body}
        if not body or len(dtypes) != 1 or (code := dtypes.pop()) not in _DTYPES:
            return None
        dtype = _DTYPES[code]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        runs: list[list[int]] = []  # [file offset, buffer offset, bytes] of adjacent tensors
        filled = 0
        for k in body:
            begin, end = header[k]["data_offsets"]
            if end - begin != math.prod(header[k]["shape"]) * itemsize:
                return None
            if runs and runs[-1][0] + runs[-1][2] == begin:
                runs[-1][2] += end - begin
            elif runs and begin < runs[-1][0] + runs[-1][2]:
                return None  # not in name order
            else:
                runs.append([begin, filled, end - begin])
            filled += end - begin
        layout = _layout([(k, torch.Size(header[k]["shape"])) for k in body])
        flat = torch.empty(filled // itemsize, dtype=dtype)
        raw = memoryview(flat.view(torch.uint8).numpy())
        for at, into, nbytes in runs:
            f.seek(8 + length + at)
            if f.readinto(raw[into:into + nbytes]) != nbytes:
                return None
    return flat, layout
