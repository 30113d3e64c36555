"""Where the runtime keeps its tensors: host numpy arrays, or device allocations by pointer.

The KV caches and the target's step tensors (embeddings, logits, hidden states) live in one
:class:`Memory` per target:

- :class:`HostMemory`: numpy arrays. The CPU backend binds them by pointer, so graphs read
  the past and write the present rows in place (zero-copy).
- :class:`DeviceMemory`: raw device allocations (ONNX Runtime ``OrtValue`` on CUDA, or
  ``cudaMalloc`` for TensorRT) handed to the graphs as :class:`DeviceTensor` views (pointer,
  shape, dtype). Only what the host asks for crosses, and every crossing is counted in
  ``traffic``. With device ``"cpu"`` (ORT CPU ``OrtValue`` s) the same code runs without a
  GPU; the tests use that.

Both implement every call of :class:`Memory`, so the KV cache, the target, the drafter
sessions and the runners hold no memory-specific code. Shapes are the same in both: a
graph's tensors are ``[1, S, ...]`` (batch axis first) wherever they live; the host sees
``[S, ...]`` rows only where it reads them (``to_host(...)[0]``, ``rows_to_host``).
:class:`AlignedIO` gives a graph call the aligned, non-null addresses TensorRT needs,
staging what is not.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np


@dataclass(frozen=True)
class DeviceTensor:
    """A contiguous tensor in device memory: what a graph input or output is bound to."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: str          # "cuda" or "cpu" (ORT device names)
    device_id: int = 0
    # What keeps the memory allocated: a view keeps its allocation alive, as a numpy view
    # keeps its base (a released or grown-out buffer is freed when its last view goes).
    owner: object = field(default=None, repr=False, compare=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def view(self, offset_bytes: int, shape: tuple[int, ...], dtype=None) -> "DeviceTensor":
        """The contiguous sub-tensor ``shape`` (of ``dtype``, by default this one's) starting
        ``offset_bytes`` into this one."""
        view = DeviceTensor(self.ptr + offset_bytes, tuple(shape),
                            self.dtype if dtype is None else np.dtype(dtype),
                            self.device, self.device_id, self.owner)
        if offset_bytes < 0 or offset_bytes + view.nbytes > self.nbytes:
            raise ValueError(f"view of {view.nbytes} bytes at {offset_bytes} is outside a "
                             f"{self.nbytes}-byte tensor")
        return view


def is_device(array) -> bool:
    return isinstance(array, DeviceTensor)


def host_batch(rows: np.ndarray, dtype) -> np.ndarray:
    """Host rows ``[S, ...]`` as a graph's ``[1, S, ...]`` input of ``dtype`` (contiguous;
    a view where they already are)."""
    return np.ascontiguousarray(rows, dtype)[None]


@dataclass
class Traffic:
    """Bytes copied host -> device and device -> host (explicit copies and host-bound IO)."""

    h2d: int = 0
    d2h: int = 0

    @property
    def total(self) -> int:
        return self.h2d + self.d2h

    def snapshot(self) -> "Traffic":
        return Traffic(self.h2d, self.d2h)

    def since(self, before: "Traffic") -> "Traffic":
        return Traffic(self.h2d - before.h2d, self.d2h - before.d2h)


class Memory(Protocol):
    """Where one target keeps its caches and step tensors (and its drafters theirs).

    Tensors are numpy arrays (:class:`HostMemory`) or :class:`DeviceTensor` s
    (:class:`DeviceMemory`), shaped alike. ``traffic`` counts the bytes that cross between
    the host and the memory: explicit copies (``from_host``, ``to_host``, ``rows_to_host``)
    and host arrays a backend binds to a graph running on the memory (``count_host_io``).
    """

    device: str
    device_id: int
    traffic: Traffic

    def empty(self, shape, dtype):
        """A zero-filled tensor, kept until ``release`` (or ``close``)."""

    def release(self, tensor) -> None:
        """Forget ``tensor`` (from ``empty``): freed once no view of it is left."""

    def close(self) -> None:
        """Free every tensor now."""

    def scratch(self, key: str, shape, dtype, alignment: int = 1):
        """A tensor for step outputs named ``key``, at a multiple of ``alignment`` bytes."""

    def rows(self, buffer, lead: tuple[int, ...], start: int, stop: int):
        """Rows ``[start, stop)`` of slab ``buffer[lead]`` as a ``[1, stop - start, ...]`` view."""

    def move_rows(self, buffer, src: np.ndarray, dst: np.ndarray) -> None:
        """``buffer[:, :, dst] = buffer[:, :, src]`` (KV layout ``[L, 2, rows, ...]``)."""

    def take_rows(self, src, rows, key: str):
        """``src[rows][None]``: rows of a ``[R, W]`` buffer as a ``[1, n, W]`` tensor."""

    def copy_row(self, dst, dst_row: int, src, src_row: int) -> None:
        """``dst[dst_row] = src[src_row]`` over the last two axes (``[.., R, W]``)."""

    def copy(self, dst, src) -> None:
        """``dst[...] = src`` within the memory (same byte size)."""

    def from_host(self, tensor, array: np.ndarray) -> None:
        """``tensor[...] = array``, done when this returns."""

    def to_host(self, tensor, out: np.ndarray | None = None) -> np.ndarray:
        """``tensor`` on the host (in ``out`` when given)."""

    def rows_to_host(self, tensor, rows) -> np.ndarray:
        """``tensor[0, rows]`` of a ``[1, S, X]`` tensor: only those rows cross."""

    def count_host_io(self, feeds: dict, outputs: dict) -> None:
        """Count the host arrays among a graph call's ``feeds`` (in) and ``outputs`` (out)."""


class HostMemory:
    """numpy arrays: the CPU backend's zero-copy path (nothing crosses)."""

    device, device_id = "host", 0

    def __init__(self) -> None:
        self.traffic = Traffic()  # stays zero

    def empty(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def release(self, array: np.ndarray) -> None:
        """Nothing to do: numpy frees what is no longer referenced."""

    def close(self) -> None:
        """Nothing to do (as ``release``)."""

    def scratch(self, key: str, shape, dtype, alignment: int = 1) -> np.ndarray:
        """A new array of ``shape`` (not reused, unlike a device's: the host may keep step
        outputs), starting at a multiple of ``alignment`` bytes."""
        dtype = np.dtype(dtype)
        if alignment == 1:
            return np.empty(shape, dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.empty(nbytes + alignment, np.uint8)
        start = -raw.ctypes.data % alignment
        return raw[start:start + nbytes].view(dtype).reshape(shape)

    def rows(self, buffer: np.ndarray, lead: tuple[int, ...], start: int, stop: int) -> np.ndarray:
        """``buffer[lead][None, start:stop]``: rows of one slab, batch axis added."""
        return buffer[lead][None, start:stop]

    def move_rows(self, buffer: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        """``buffer[:, :, dst] = buffer[:, :, src]`` (KV layout ``[L, 2, rows, ...]``)."""
        buffer[:, :, dst] = buffer[:, :, src]

    def take_rows(self, src: np.ndarray, rows, key: str) -> np.ndarray:
        """``src[rows][None]``: rows of a ``[R, W]`` buffer as a ``[1, n, W]`` tensor."""
        return src[rows][None]

    def copy_row(self, dst: np.ndarray, dst_row: int, src: np.ndarray, src_row: int) -> None:
        """``dst[dst_row] = src[src_row]`` over the last two axes (``[.., R, W]``)."""
        dst.reshape(-1, dst.shape[-1])[dst_row] = src.reshape(-1, src.shape[-1])[src_row]

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst[...] = src`` (same size)."""
        dst[...] = np.reshape(src, dst.shape)

    def from_host(self, tensor: np.ndarray, array: np.ndarray) -> None:
        tensor[...] = np.reshape(array, tensor.shape)

    def to_host(self, array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``array`` itself (or copied into ``out``)."""
        if out is None:
            return array
        out[...] = array
        return out

    def rows_to_host(self, array: np.ndarray, rows) -> np.ndarray:
        """``array[0, rows]`` of a ``[1, S, X]`` tensor."""
        return array[0, rows]

    def count_host_io(self, feeds: dict, outputs: dict) -> None:
        """Nothing crosses: the graphs read and write host arrays in place."""


class Allocation(Protocol):
    """What ``allocate`` returns beside the pointer: frees the memory on ``free()`` (and
    when collected)."""

    def free(self) -> None: ...


class DeviceMemory:
    """Device allocations behind ``allocate(nbytes) -> (ptr, Allocation)`` and a
    :class:`Copier`.

    Scratch tensors (step outputs) are one allocation per key, grown when a call needs
    more; the outgrown one lives on while a view of it does. ``close`` frees everything.
    """

    def __init__(self, device: str, allocate: Callable[[int], tuple[int, Allocation]],
                 copier: "Copier", device_id: int = 0):
        self.device, self.device_id = device, device_id
        self._allocate, self.copier = allocate, copier
        self.traffic = Traffic()
        self._owners: dict[int, Allocation] = {}     # pointer -> its allocation
        self._scratch: dict[str, DeviceTensor] = {}

    def empty(self, shape, dtype) -> DeviceTensor:
        """A zero-filled allocation (zeroing is set-up, not counted as traffic). Never
        null: an empty tensor gets one byte."""
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        ptr, owner = self._allocate(nbytes)
        self._owners[ptr] = owner
        self.copier.zero(ptr, nbytes)
        self.copier.synchronize()
        return DeviceTensor(ptr, tuple(int(s) for s in shape), dtype, self.device,
                            self.device_id, owner)

    def release(self, tensor: DeviceTensor) -> None:
        """Forget the allocation ``tensor`` (from ``empty``) heads: it is freed once no view
        of it is left."""
        self._owners.pop(tensor.ptr, None)

    def close(self) -> None:
        """Free every allocation now; tensors and views of this memory become invalid."""
        owners, self._owners, self._scratch = self._owners, {}, {}
        for owner in owners.values():
            owner.free()

    def rows(self, buffer: DeviceTensor, lead: tuple[int, ...], start: int,
             stop: int) -> DeviceTensor:
        """Rows ``[start, stop)`` of slab ``buffer[lead]``, as ``[1, stop - start, ...]``."""
        slab_shape = buffer.shape[len(lead):]
        row_bytes = int(np.prod(slab_shape[1:], dtype=np.int64)) * buffer.dtype.itemsize
        slab = int(np.ravel_multi_index(lead, buffer.shape[:len(lead)])) if lead else 0
        offset = (slab * slab_shape[0] + start) * row_bytes
        return buffer.view(offset, (1, stop - start, *slab_shape[1:]))

    def move_rows(self, buffer: DeviceTensor, src: np.ndarray, dst: np.ndarray) -> None:
        """``buffer[:, :, dst] = buffer[:, :, src]`` on the device: one strided copy per row
        (every layer's K and V at once). Needs ascending ``dst <= src``, as compaction gives:
        no copy then reads a row an earlier one wrote."""
        slabs = buffer.shape[0] * buffer.shape[1]
        row_bytes = int(np.prod(buffer.shape[3:], dtype=np.int64)) * buffer.dtype.itemsize
        pitch = buffer.shape[2] * row_bytes
        for s, d in zip(np.asarray(src).tolist(), np.asarray(dst).tolist()):
            self.copier.copy_2d(buffer.ptr + d * row_bytes, pitch, buffer.ptr + s * row_bytes,
                                pitch, row_bytes, slabs)
        self.copier.synchronize()

    def scratch(self, key: str, shape, dtype, alignment: int = 1) -> DeviceTensor:
        """A device tensor of ``shape`` for step outputs named ``key`` (reused, grown),
        starting at a multiple of ``alignment`` bytes."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + alignment - 1
        have = self._scratch.get(key)
        if have is None or have.nbytes < need:
            if have is not None:
                self.release(have)
            have = self.empty((need,), np.uint8)
            self._scratch[key] = have
        return have.view(-have.ptr % alignment, shape, dtype)

    def take_rows(self, src: DeviceTensor, rows, key: str) -> DeviceTensor:
        """``src[rows][None]`` gathered on the device into scratch ``key``."""
        rows = np.asarray(rows, np.int64).tolist()
        out = self.scratch(key, (1, len(rows), src.shape[-1]), src.dtype)
        for i, r in enumerate(rows):
            self._copy_row(out, i, src, r)
        self.copier.synchronize()
        return out

    def copy_row(self, dst: DeviceTensor, dst_row: int, src: DeviceTensor, src_row: int) -> None:
        """``dst[dst_row] = src[src_row]`` over the last two axes, on the device."""
        self._copy_row(dst, dst_row, src, src_row)
        self.copier.synchronize()

    def _copy_row(self, dst: DeviceTensor, dst_row: int, src: DeviceTensor, src_row: int) -> None:
        width = src.shape[-1] * src.dtype.itemsize
        self.copier.copy_2d(dst.ptr + dst_row * width, width, src.ptr + src_row * width,
                            width, width, 1)

    def copy(self, dst: DeviceTensor, src: DeviceTensor) -> None:
        """``dst[...] = src`` on the device (same byte size)."""
        if dst.nbytes != src.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into a {dst.nbytes}-byte tensor")
        if src.nbytes:
            self.copier.copy_2d(dst.ptr, src.nbytes, src.ptr, src.nbytes, src.nbytes, 1)
        self.copier.synchronize()

    def to_host(self, tensor: DeviceTensor, out: np.ndarray | None = None) -> np.ndarray:
        """``tensor`` copied into ``out`` (a new array by default)."""
        out = np.empty(tensor.shape, tensor.dtype) if out is None else out
        if out.shape != tensor.shape or out.dtype != tensor.dtype or not out.flags.c_contiguous:
            raise ValueError(f"host buffer {out.dtype} {out.shape} for a {tensor.dtype} "
                             f"{tensor.shape} tensor")
        self.copier.to_host(out, tensor.ptr)
        self.traffic.d2h += out.nbytes
        return out

    def from_host(self, tensor: DeviceTensor, array: np.ndarray) -> None:
        """``tensor[...] = array``, finished before this returns (a copy from pageable host
        memory may still be in flight when ``cudaMemcpy`` returns)."""
        array = np.ascontiguousarray(array, tensor.dtype).reshape(tensor.shape)
        self.copier.from_host(tensor.ptr, array)
        self.copier.synchronize()
        self.traffic.h2d += array.nbytes

    def rows_to_host(self, tensor: DeviceTensor, rows) -> np.ndarray:
        """``tensor[0, rows]`` of a ``[1, S, X]`` tensor: only those rows cross."""
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        width = tensor.shape[2]
        out = np.empty((len(rows), width), tensor.dtype)
        row_bytes = width * tensor.dtype.itemsize
        for i, r in enumerate(rows.tolist()):
            self.copier.to_host(out[i], tensor.ptr + (r % tensor.shape[1]) * row_bytes)
        self.traffic.d2h += out.nbytes
        return out

    def count_host_io(self, feeds: dict, outputs: dict) -> None:
        """Host arrays bound to a graph on the device cross: feeds in, outputs back."""
        self.traffic.h2d += sum(a.nbytes for a in feeds.values() if not is_device(a))
        self.traffic.d2h += sum(a.nbytes for a in outputs.values() if not is_device(a))


ALIGNMENT = 256  # bytes: TensorRT's documented minimum for every I/O tensor address


class AlignedIO:
    """The device tensors one graph call binds, each at a multiple of ``alignment`` bytes
    and never at address 0 (TensorRT's ``set_tensor_address`` rule).

    Host arrays go through one device buffer per tensor (inputs copied in, outputs copied
    back by ``finish``). Device tensors are bound where they are when aligned; a misaligned
    one (a KV row view at an odd row where a row is not a multiple of 256 bytes: small or
    MQA shapes) is staged through an aligned buffer, copied in before the call or out by
    ``finish``. ``staged`` counts those device-to-device bytes.
    """

    def __init__(self, memory: DeviceMemory, alignment: int = ALIGNMENT, key: str = "io"):
        self.memory, self.alignment, self.key = memory, alignment, key
        self.staged = 0
        self._back: list[tuple[DeviceTensor, DeviceTensor | np.ndarray]] = []

    def inputs(self, feeds: dict) -> dict[str, DeviceTensor]:
        """Aligned device tensors holding ``feeds`` (numpy arrays or device tensors)."""
        bound = self._bound(feeds)
        for name, array in feeds.items():
            if bound[name] is not array:
                self._move(bound[name], array)
        return bound

    def outputs(self, outputs: dict) -> dict[str, DeviceTensor]:
        """Aligned device tensors the call writes ``outputs`` to (``finish`` then moves
        what went to a stand-in into the caller's buffer)."""
        bound = self._bound(outputs)
        self._back += [(bound[name], array) for name, array in outputs.items()
                       if bound[name] is not array]
        return bound

    def finish(self) -> None:
        """After the call: copy the stand-in outputs into their callers' buffers."""
        back, self._back = self._back, []
        for buffer, array in back:
            self._move(array, buffer)

    def _bound(self, tensors: dict) -> dict[str, DeviceTensor]:
        """Each tensor itself where it can be bound (aligned on the device), else its
        aligned stand-in (one scratch buffer per name)."""
        return {name: array if is_device(array) and array.ptr % self.alignment == 0
                else self.memory.scratch(f"{self.key}:{name}", array.shape, array.dtype,
                                         self.alignment)
                for name, array in tensors.items()}

    def _move(self, dst, src) -> None:
        """``dst[...] = src`` between a stand-in and a caller's host array or device tensor."""
        if not is_device(dst):
            self.memory.to_host(src, dst)
        elif not is_device(src):
            self.memory.from_host(dst, src)
        else:
            self.memory.copy(dst, src)
            self.staged += src.nbytes


class Copier:
    """Copy primitives of one device kind. Device-to-device copies and fills may run
    asynchronously: ``synchronize`` waits for them before the next graph runs on its own
    stream."""

    def zero(self, ptr: int, nbytes: int) -> None: ...
    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int,
                height: int) -> None: ...
    def to_host(self, out: np.ndarray, src: int) -> None: ...
    def from_host(self, dst: int, array: np.ndarray) -> None: ...
    def synchronize(self) -> None: ...

    def activate(self) -> None:
        """Make this copier's device the calling thread's current one (a GPU's only)."""


class HostCopier(Copier):
    """Copies within host memory (ORT CPU ``OrtValue`` s): ``memmove``."""

    def zero(self, ptr, nbytes):
        ctypes.memset(ptr, 0, nbytes)

    def copy_2d(self, dst, dpitch, src, spitch, width, height):
        for i in range(height):
            ctypes.memmove(dst + i * dpitch, src + i * spitch, width)

    def to_host(self, out, src):
        ctypes.memmove(out.ctypes.data, src, out.nbytes)

    def from_host(self, dst, array):
        ctypes.memmove(dst, array.ctypes.data, array.nbytes)

    def synchronize(self):
        pass

