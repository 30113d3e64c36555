"""TensorRT backend: a serialized engine run through the name-based API of TensorRT 10+.

``tensorrt`` is imported when a runner is made, so importing this module never fails.
Buffers, copies and the stream come from the one CUDA layer, ``backends.cuda``, through the
target's ``DeviceMemory``. ``DeviceTensor`` feeds and outputs (a device KV cache's row views,
step scratch) are bound by address with ``set_tensor_address``: nothing is copied, unless
an address is not 256-byte aligned (TensorRT's rule), which ``device.AlignedIO`` stages
through an aligned buffer on the device. Host numpy feeds are copied to device buffers of
that memory and host outputs copied back into the caller's arrays; the memory counts their
bytes in its ``traffic``. Every TensorRT call that reports failure raises, naming the tensor.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..device import AlignedIO, DeviceMemory, Traffic
from ..errors import ShapeError, VispecError
from ..specs import GraphSpec
from .base import GraphRunner


class TensorRTMissingError(VispecError):
    """The ``tensorrt`` Python package cannot be imported."""


def import_tensorrt():
    """The ``tensorrt`` module, or a :class:`TensorRTMissingError` saying what to do."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTMissingError(
            f"TensorRT is not available ({e}). Expected: the `tensorrt` Python package "
            f">= 10.3 (and polygraphy to build engines). Hint: on Jetson install JetPack 6.2+ (it ships "
            f"TensorRT 10.3); on x86 `pip install vispec-export[tensorrt]` on a machine with "
            f"an NVIDIA GPU; or use `--backend ort`") from e
    return tensorrt


class TrtRunner(GraphRunner):
    """One engine, one execution context, one CUDA stream, on the GPU of ``memory``: the
    target's CUDA ``DeviceMemory`` (shared by its runners and drafters), or one of the
    runner's own on GPU 0. Host IO and staging buffers are scratch of that memory, grown on
    demand.

    With several optimization profiles, each call uses the first one whose ranges hold
    every input shape (the builder makes them disjoint in ``new``).
    """

    def __init__(self, path: str | os.PathLike, spec: GraphSpec,
                 memory: DeviceMemory | None = None):
        super().__init__(spec)
        trt = import_tensorrt()
        from .cuda import cuda_memory

        self._own_memory = memory is None
        self.memory = cuda_memory() if memory is None else memory
        if not isinstance(self.memory, DeviceMemory) or self.memory.device != "cuda":
            raise VispecError(f"graph {spec.name!r}: the tensorrt backend binds CUDA device "
                              f"memory, not {self.memory.device!r} memory. Hint: leave the "
                              f"target's memory to its default (backends.default_memory)")
        self.memory.copier.activate()
        self.io = AlignedIO(self.memory, key=f"io:{spec.name}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise VispecError(f"could not load the TensorRT engine {path} (TensorRT "
                              f"{trt.__version__}). Hint: an engine only runs on the TensorRT "
                              f"version and GPU that built it: rebuild it on this device")
        self._check_io(trt)
        self.context = self.engine.create_execution_context()
        self.stream = self.memory.copier.stream()
        self.ranges = [{name: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(
                            name, p)) for name in self.spec.input_names}
                       for p in range(self.engine.num_optimization_profiles)]
        self.profile = 0

    @property
    def traffic(self) -> Traffic:
        """Host <-> device bytes of ``memory`` (host IO staged by this runner included)."""
        return self.memory.traffic

    def _check_io(self, trt) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        problems = []
        if sorted(names) != sorted(self.spec.input_names + self.spec.output_names):
            problems.append(f"engine tensors {sorted(names)}, spec tensors "
                            f"{sorted(self.spec.input_names + self.spec.output_names)}")
        for name in set(names) & set(self.spec.input_names + self.spec.output_names):
            dtype = self.engine.get_tensor_dtype(name)
            if _numpy_dtype(trt, dtype) != self.spec.tensor(name).np_dtype:
                problems.append(f"tensor {name!r} | engine dtype {dtype.name}. Expected: "
                                f"{self.spec.tensor(name).dtype}")
        if problems:
            raise VispecError(f"graph {self.spec.name!r}: the engine does not match the "
                              f"manifest: {'; '.join(problems)}. Hint: rebuild the engines "
                              f"from this artifact folder")

    def select_profile(self, feeds: dict[str, np.ndarray]) -> int:
        """Index of the first optimization profile whose ranges hold the feeds' shapes."""
        for index, ranges in enumerate(self.ranges):
            if all(all(lo <= n <= hi for lo, n, hi in zip(ranges[name][0], a.shape,
                                                           ranges[name][2]))
                   for name, a in feeds.items()):
                return index
        shapes = {name: a.shape for name, a in feeds.items()}
        raise ShapeError(f"graph {self.spec.name!r}: input shapes {shapes} fit none of the "
                         f"engine's {len(self.ranges)} optimization profiles. Hint: rebuild "
                         f"the engine with profiles covering the manifest's dim ranges")

    def _infer_impl(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        self.memory.copier.activate()
        self._set_shapes(feeds, outputs)
        bound = {**self.io.inputs(feeds), **self.io.outputs(outputs)}
        for name, tensor in bound.items():
            if not self.context.set_tensor_address(name, tensor.ptr):
                raise VispecError(f"graph {self.spec.name!r}: tensor {name!r} | address "
                                  f"{tensor.ptr:#x} refused by TensorRT. Expected: a "
                                  f"256-byte aligned device address. Hint: see the TensorRT "
                                  f"log above")
        if not self.context.execute_async_v3(self.stream.ptr):
            raise VispecError(f"graph {self.spec.name!r}: TensorRT execution failed (see the "
                              f"TensorRT log above)")
        self.stream.synchronize()
        self.io.finish()

    def _set_shapes(self, feeds: dict, outputs: dict) -> None:
        """Select the profile of the feeds' shapes, set them, and check the outputs'."""
        ctx, profile = self.context, self.select_profile(feeds)
        if profile != self.profile:
            if not ctx.set_optimization_profile_async(profile, self.stream.ptr):
                raise VispecError(f"graph {self.spec.name!r}: TensorRT refused optimization "
                                  f"profile {profile} of {len(self.ranges)}. Hint: see the "
                                  f"TensorRT log above; rebuild the engine")
            self.profile = profile
        for name, array in feeds.items():
            if not ctx.set_input_shape(name, array.shape):
                raise ShapeError(f"graph {self.spec.name!r}: input {name!r} | shape "
                                 f"{array.shape} refused by optimization profile {profile}")
        for name, array in outputs.items():
            if tuple(ctx.get_tensor_shape(name)) != array.shape:
                raise ShapeError(f"graph {self.spec.name!r}: output {name!r} | engine shape "
                                 f"{tuple(ctx.get_tensor_shape(name))}. Expected: "
                                 f"{array.shape} from the manifest. Hint: rebuild the engine")

    def close(self) -> None:
        """Free the context, engine and stream (and the memory, when the runner made it;
        a target's memory is freed by the target)."""
        if self.stream is None:
            return
        self.context = self.engine = None
        self.stream.free()
        self.stream = None
        if self._own_memory:
            self.memory.close()


def _numpy_dtype(trt, dtype) -> np.dtype | None:
    """The numpy dtype of a TensorRT ``DataType`` (``tensorrt.nptype``); None for types
    numpy lacks (bfloat16, fp8, int4), which no spec tensor has."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        return None
