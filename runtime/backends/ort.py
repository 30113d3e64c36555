"""ONNX Runtime backend: IO binding by pointer onto caller-owned buffers, host or device."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from ..cpu_load import QUIET_CORES, contention, sample_cpu
from ..device import ALIGNMENT, DeviceMemory, DeviceTensor, HostCopier, HostMemory, Memory
from ..errors import ManifestError, VispecError
from ..specs import GraphSpec
from .base import GraphRunner

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
SPINNING_ENV = "VISPEC_ORT_SPINNING"  # "1" / "0" overrides spinning()'s choice
LOAD_SAMPLE_SECONDS = 0.2
LOAD_ERRORS = (ort_errors.Fail, ort_errors.InvalidProtobuf, ort_errors.InvalidGraph,
               ort_errors.NoSuchFile, ort_errors.InvalidArgument)
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def available_providers() -> list[str]:
    return ort.get_available_providers()


def shadowed_gpu_wheel() -> str | None:
    """Why ONNX Runtime's CUDA provider may be missing though onnxruntime-gpu is installed:
    beside the CPU wheel (both install the same ``onnxruntime`` package, and the one
    installed last wins). None when only one is installed."""
    names = {(d.metadata["Name"] or "").lower().replace("_", "-")
             for d in importlib.metadata.distributions()}
    if {"onnxruntime", "onnxruntime-gpu"} <= names and CUDA not in available_providers():
        return ("onnxruntime and onnxruntime-gpu are both installed and the CPU wheel "
                "shadows the GPU one (no CUDAExecutionProvider): `pip uninstall -y "
                "onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`")
    return None


@functools.cache
def spinning(threads: int | None) -> bool:
    """Whether pool workers spin between a run's ops (they stop when it ends: target and
    drafter sessions alternate on the same cores). Spinning saves each op a wake-up (quiet
    int4 decode steps took ~1.4x as long without) but fights other processes for the
    cores (~2x slower steps where they run): so it is on when ``threads`` cores are free,
    from a ``LOAD_SAMPLE_SECONDS`` sample of the others' CPU use (once per process and
    thread count); ``VISPEC_ORT_SPINNING=1`` or ``0`` decides instead."""
    forced = os.environ.get(SPINNING_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    before, start = sample_cpu(), time.perf_counter()
    time.sleep(LOAD_SAMPLE_SECONDS)
    others = contention(before, sample_cpu(), os.getpid(), time.perf_counter() - start).cores
    cores = os.cpu_count() or 1
    return others <= QUIET_CORES * 2 + cores - min(threads or cores, cores)


def provider_options(providers: list[str], device_id: int = 0) -> list:
    """``InferenceSession`` providers: CUDA on GPU ``device_id`` with TF32 off (fp32
    matmuls round like the CPU's: the parity tests' tolerances assume it)."""
    return [(p, {"device_id": str(device_id), "use_tf32": "0"}) if p == CUDA else p
            for p in providers]


class OrtAllocation:
    """An ``OrtValue`` held until ``free()``."""

    def __init__(self, value: ort.OrtValue):
        self.value = value

    def free(self) -> None:
        self.value = None


def ort_memory(device: str = "cuda", device_id: int = 0) -> DeviceMemory:
    """Device memory made of ``OrtValue`` allocations on ``device``: "cuda" for the CUDA
    provider, or "cpu" to run the device-resident path (pointers, explicit copies, traffic
    counts, alignment) without a GPU. Allocations start at ``ALIGNMENT`` bytes, as
    ``cudaMalloc``'s do (ORT's CPU allocator gives 64)."""
    def allocate(nbytes: int):
        value = ort.OrtValue.ortvalue_from_shape_and_type([nbytes + ALIGNMENT - 1], np.uint8,
                                                          device, device_id)
        return value.data_ptr() + -value.data_ptr() % ALIGNMENT, OrtAllocation(value)

    if device == "cuda":
        from .cuda import CudaCopier
        copier = CudaCopier(device_id)
    else:
        copier = HostCopier()
    return DeviceMemory(device, allocate, copier, device_id)


class OrtRunner(GraphRunner):
    """One ``InferenceSession`` per graph; inputs and outputs bound by pointer.

    numpy arrays are bound as host memory: on CPU this is zero-copy (KV views are read and
    written in place); on a device ONNX Runtime copies them across, counted by ``memory``
    (the target's: its ``device_id`` is the CUDA provider's). :class:`DeviceTensor` s are
    bound on their device. ``keep_spinning``: where ``spinning()`` lets the pool spin,
    it spins on between runs too (stopped at each run's end otherwise): for a session no
    other session alternates with (``TargetModel``'s).
    """

    def __init__(self, path: str | os.PathLike, spec: GraphSpec, *,
                 providers: list[str] | None = None, threads: int | None = None,
                 memory: Memory | None = None, keep_spinning: bool = False):
        super().__init__(spec)
        self.memory = memory or HostMemory()
        device_id = self.memory.device_id
        providers = providers or [CPU]
        missing = [p for p in providers if p not in available_providers()]
        if missing:
            raise VispecError(f"ONNX Runtime providers {missing} are not available (have "
                              f"{available_providers()}). Hint: "
                              f"{shadowed_gpu_wheel() or 'install onnxruntime-gpu for CUDA'}"
                              f", or use the CPU provider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.add_session_config_entry(  # one thread: no pool, nothing to spin
            "session.intra_op.allow_spinning", "1" if threads != 1 and spinning(threads) else "0")
        options.add_session_config_entry(  # spinning on between runs: ONNX Runtime's default
            "session.force_spinning_stop", "0" if keep_spinning else "1")
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=provider_options(providers, device_id))
        except LOAD_ERRORS as e:
            raise ManifestError(f"cannot load graph {path}: {str(e).strip()[:300]}. Hint: the "
                                f"file is truncated or corrupt; copy it again or re-export") from e
        check_graph(self.session, spec, path)
        self.binding = self.session.io_binding()
        self._bound: dict[str, tuple] = {}  # name -> (array, _where(array)) bound last

    def _infer_held(self, feeds: dict, outputs: dict, held: tuple, changed: bool) -> None:
        """Bind what differs from the last call (a buffer bound to the same place, shape
        and dtype stays bound; ``held`` mappings of the last call are skipped whole: the KV
        slabs of a ``gqa`` graph are bound once), then run."""
        if changed:
            for name, array in held[0].items():
                self._bind(self.binding.bind_input, name, array, feed=True)
            for name, array in held[1].items():
                self._bind(self.binding.bind_output, name, array, feed=False)
        for name, array in feeds.items():
            self._bind(self.binding.bind_input, name, array, feed=True)
        for name, array in outputs.items():
            self._bind(self.binding.bind_output, name, array, feed=False)
        self.memory.count_host_io(feeds, outputs)
        self.session.run_with_iobinding(self.binding)

    def _bind(self, bind, name: str, array, feed: bool) -> None:
        last = self._bound.get(name)
        if last is not None and last[0] is array:  # the same buffer object: bound already
            return
        if feed and not isinstance(array, DeviceTensor):  # its contiguous copy lives on in
            array = np.ascontiguousarray(array)             # ``_bound`` (outputs are written)
        where = _where(array)
        if last is None or last[1] != where:
            bind(name, *where)
        self._bound[name] = (array, where)

    def bound_step(self, feeds: dict, outputs: dict) -> "BoundStep":
        """A run of this graph over ``feeds`` and ``outputs`` (host or device buffers, every
        input and output), checked against the spec once and bound once on an IO binding
        of its own (this runner's bindings stay as they are)."""
        self._check(feeds, outputs)
        return BoundStep(self.session, feeds, outputs)

    def close(self) -> None:
        self.session = None
        self.binding = None


class BoundStep:
    """A graph run whose buffers stay bound between calls (contiguous, kept alive by the
    caller): a loop rewrites its inputs in place, ``rebind_value`` s the one whose shape
    changes, and ``run`` s (no per-call checks). ``value`` wraps a host buffer for it: right
    after a run, when the weights have evicted the caches, a bind by pointer cost ~70 us,
    by value a fraction of it."""

    def __init__(self, session: ort.InferenceSession, feeds: dict, outputs: dict):
        self.session, self.binding = session, session.io_binding()
        for name, array in feeds.items():
            self.binding.bind_input(name, *_where(array))
        for name, array in outputs.items():
            self.binding.bind_output(name, *_where(array))

    @staticmethod
    def value(array: np.ndarray) -> ort.OrtValue:
        """``array`` (contiguous, kept alive by the value) as a value to bind."""
        return ort.OrtValue.ortvalue_from_numpy(array)

    def rebind_value(self, name: str, value: ort.OrtValue) -> None:
        self.binding.bind_ortvalue_input(name, value)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


def _where(array) -> tuple:
    """``bind_input`` / ``bind_output`` arguments after the name: device, id, dtype, shape,
    pointer."""
    if isinstance(array, DeviceTensor):
        return array.device, array.device_id, array.dtype, list(array.shape), array.ptr
    return "cpu", 0, array.dtype, list(array.shape), array.ctypes.data


def _mismatches(kind: str, args: list, specs: tuple) -> list[str]:
    """Differences between a session's inputs or outputs and the spec's tensors."""
    found = {a.name: a for a in args}
    if found.keys() != {t.name for t in specs}:
        return [f"{kind}s {sorted(found)}, manifest {sorted(t.name for t in specs)}"]
    problems = []
    for t in specs:
        arg = found[t.name]
        dtype = ORT_DTYPES.get(arg.type, arg.type)
        static = [(d, e) for d, e in zip(arg.shape, t.shape)
                  if isinstance(d, int) and isinstance(e, int) and d != e]
        if dtype != t.dtype or len(arg.shape) != len(t.shape) or static:
            problems.append(f"{kind} {t.name!r} is {dtype} {list(arg.shape)}, manifest "
                            f"{t.dtype} {list(t.shape)}")
    return problems


def check_graph(session: ort.InferenceSession, spec: GraphSpec, path: str | os.PathLike) -> None:
    """Refuse a graph file whose IO names, dtypes, ranks or static dims differ from the
    manifest's spec (a replaced graph, or an edited manifest)."""
    problems = (_mismatches("input", session.get_inputs(), spec.inputs)
                + _mismatches("output", session.get_outputs(), spec.outputs))
    if problems:
        raise ManifestError(f"graph {path} does not match its manifest: {'; '.join(problems)}. "
                            f"Hint: keep the graphs and manifest.json of one export together, "
                            f"or re-export")
