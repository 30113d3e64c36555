"""Build one TensorRT engine per exported graph, plus a manifest that points at them.

Precision on TensorRT 10.x uses builder flags (fp16; int8 = Q/DQ graph + int8/fp16 flags).
TensorRT 11 builds strongly typed networks only: precision comes from the ONNX graph, so
int8 means a Q/DQ graph and fp16 means a float16 export. Everything before the TensorRT
call (config, plan, profiles, Q/DQ) runs without TensorRT.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping

import numpy as np
import onnx
import polygraphy
from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network, network_from_onnx_path
from polygraphy.exception import PolygraphyException

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.backends.tensorrt import import_tensorrt
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import PROCESSOR_DIR, GraphEntry, Manifest
from vispec.runtime.specs import STANDARD, Dim, GraphSpec
from vispec.runtime.weights import FLOAT, weight_graphs

from .profiles import DEFAULT_SPLITS, ProfileShapes, graph_profiles, split_dim, to_polygraphy
from .quantize import DEFAULT_PROMPTS, lm_calibration_feeds, quantize_qdq
from .weights_dq import check_int4_blocks, to_dequantize_linear

PRECISIONS = ("fp16", "int8", "fp32")
Feeds = Iterable[dict[str, np.ndarray]]


@dataclass(frozen=True)
class BuildConfig:
    """How to build: precision, builder workspace, timing cache and ``new``-dim profiles.

    ``profiles`` are ``(name, inclusive max of new)`` pairs, the last one ``None`` (up to
    the graph's max); empty means one profile over each graph's whole range.
    """

    precision: str = "fp16"
    workspace_mib: int | None = None
    timing_cache: Path | None = None
    profiles: tuple = DEFAULT_SPLITS
    calibration_prompts: tuple = DEFAULT_PROMPTS

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise VispecError(f"precision {self.precision!r}. Expected one of {PRECISIONS}")
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise VispecError(f"workspace {self.workspace_mib} MiB. Expected a positive size "
                              f"(or none for TensorRT's default)")
        object.__setattr__(self, "profiles", tuple((str(n), b) for n, b in self.profiles))
        names = [n for n, _ in self.profiles]
        if len(set(names)) != len(names):
            raise VispecError(f"profile names {names} repeat. Expected distinct names")
        if self.profiles:
            try:  # bounds must be increasing and end with None: check on the widest range
                split_dim(Dim("new", 1, 1, 2**31 - 1), self.profiles)
            except ValueError as e:
                raise VispecError(f"profiles {list(self.profiles)}: {e}") from e
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))

    @classmethod
    def from_cli(cls, precision: str = "fp16", workspace_mib: int | None = None,
                 timing_cache: str | None = None, profiles: str = "decode=64,prefill",
                 calibration_file: str | None = None) -> "BuildConfig":
        """From CLI strings: ``profiles`` like ``"decode=64,prefill"`` (``""``: one
        profile); ``calibration_file`` holds one prompt per line."""
        splits = []
        for part in filter(None, (p.strip() for p in profiles.split(","))):
            name, _, bound = part.partition("=")
            if bound and not bound.strip().isdigit():
                raise VispecError(f"--profiles {profiles!r}: bound {bound!r} of {name!r} is "
                                  f"not an integer. Expected e.g. 'decode=64,prefill'")
            splits.append((name.strip(), int(bound) if bound else None))
        prompts = DEFAULT_PROMPTS
        if calibration_file:
            prompts = tuple(line for line in Path(calibration_file).read_text().splitlines()
                            if line.strip())
        return cls(precision=precision, workspace_mib=workspace_mib, timing_cache=timing_cache,
                   profiles=tuple(splits), calibration_prompts=prompts)


@dataclass(frozen=True)
class GraphPlan:
    """What one graph's engine gets: source, precision, profiles and TensorRT options."""

    name: str
    onnx: Path
    spec: GraphSpec
    precision: str
    profiles: dict[str, ProfileShapes]
    strongly_typed: bool
    flags: dict  # CreateConfig precision keywords (TensorRT 10.x only)


def graph_dtype(spec: GraphSpec) -> str:
    """``float16`` if the graph carries any float16 tensor, else ``float32``."""
    dtypes = {t.dtype for t in spec.inputs + spec.outputs}
    return "float16" if "float16" in dtypes else "float32"


def precision_options(precision: str, quantized: bool, dtype: str,
                      trt_major: int) -> tuple[str, bool, dict]:
    """(precision the engine gets, strongly typed, CreateConfig flags) for one graph."""
    if trt_major >= 11:
        if quantized:
            return "int8", True, {}
        own = "fp16" if dtype == "float16" else "fp32"
        if precision != "int8" and precision != own:
            raise VispecError(
                f"precision {precision} on a {dtype} graph. TensorRT 11 builds strongly "
                f"typed networks: the ONNX graph sets the precision. Hint: `vispec-export export "
                f"--dtype {'float16' if precision == 'fp16' else 'float32'}`, or build --precision {own}")
        return own, True, {}
    if quantized:
        return "int8", False, {"int8": True, "fp16": True}
    if precision == "fp32":
        return "fp32", False, {}
    return "fp16", False, {"fp16": True}


def plan_build(manifest: Manifest, artifact_dir: str | os.PathLike, config: BuildConfig,
               trt_version: str, quantized: Collection[str] = ()) -> list[GraphPlan]:
    """Check everything that can be checked before building and decide each graph's engine.

    ``quantized`` names the graphs that get Q/DQ (the ones with calibration data); it is
    ignored unless the precision is int8.
    """
    check_attention(manifest, Path(artifact_dir))
    check_weights(manifest, Path(artifact_dir), config)
    quantized = set(quantized) if config.precision == "int8" else set()
    unknown = set(quantized) - set(manifest.graphs)
    if unknown:
        raise VispecError(f"calibration data for graphs {sorted(unknown)} that the manifest "
                          f"lacks. Expected some of {sorted(manifest.graphs)}")
    if config.precision == "int8" and not quantized:
        raise VispecError("precision int8 needs calibration data for at least one graph. "
                          "Hint: pass calibration feeds (a target's `lm` graph gets prompts "
                          "by default), or build --precision fp16")
    major = int(trt_version.split(".")[0])
    plans = []
    for name, entry in manifest.graphs.items():
        dtype = graph_dtype(entry.spec)
        if name in quantized and dtype != "float32":
            raise VispecError(f"graph {name!r} is {dtype}. Expected a float32 export to "
                              f"quantize to int8. Hint: re-export in float32")
        precision, strongly_typed, flags = precision_options(config.precision,
                                                             name in quantized, dtype, major)
        if name == "lm" and name in weight_graphs(manifest.model):
            precision = "int4"  # weight-only: the activations as the flags above say
        plans.append(GraphPlan(name, Path(artifact_dir) / entry.file, entry.spec, precision,
                               graph_profiles(entry.spec, config.profiles), strongly_typed,
                               flags))
    return plans


def check_attention(manifest: Manifest, artifact_dir: Path) -> None:
    """Refuse an LM graph in ONNX Runtime's fused form (``export --attention gqa``)."""
    if manifest.model.get("attention", STANDARD) != STANDARD:
        raise VispecError(f"{artifact_dir} holds the LM in ONNX Runtime's fused CPU form "
                          f"(--attention {manifest.model['attention']}: GroupQueryAttention and "
                          f"SkipSimplifiedLayerNormalization, which TensorRT cannot parse). "
                          f"Hint: export again with --attention {STANDARD} for TensorRT")


def check_weights(manifest: Manifest, artifact_dir: Path, config: BuildConfig) -> None:
    """Quantized weights (``export --weights``) build only as TensorRT's INT4 weight-only
    form (``weights_dq``): a target's int4 weights in blocks of 64 or 128, the activations
    not quantized on top."""
    weights = manifest.model.get("weights", FLOAT)
    if weights == FLOAT:
        return
    if manifest.kind != "target":
        raise VispecError(f"{artifact_dir} holds {weights} drafter weights (ONNX Runtime CPU "
                          f"ops TensorRT cannot parse). Hint: export the drafter again without "
                          f"--weights; TensorRT builds fp16/int8 from float32 graphs")
    if config.precision == "int8":
        raise VispecError(f"{artifact_dir} holds {weights} weights; build --precision int8 "
                          f"quantizes the activations of float graphs. Hint: build "
                          f"--precision fp16 or fp32 (INT4 weight-only engines), or export "
                          f"without --weights for int8")
    graph = onnx.load(str(artifact_dir / manifest.graph("lm").file), load_external_data=False)
    for node in graph.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            check_int4_blocks(a["bits"], a["block_size"], a["K"], f"{artifact_dir}: {weights} weights")


def create_config(plan: GraphPlan, config: BuildConfig) -> CreateConfig:
    """The polygraphy builder config of one graph (imports TensorRT only for a workspace)."""
    pools = None
    if config.workspace_mib:
        import tensorrt as trt
        pools = {trt.MemoryPoolType.WORKSPACE: config.workspace_mib << 20}
    cache = str(config.timing_cache) if config.timing_cache else None
    return CreateConfig(profiles=to_polygraphy(plan.profiles), memory_pool_limits=pools,
                        load_timing_cache=cache, **plan.flags)


def build_engine(onnx_path: Path, engine_path: Path, plan: GraphPlan,
                 config: BuildConfig) -> None:
    """Parse ``onnx_path``, build with TensorRT and write the serialized engine."""
    network = network_from_onnx_path(str(onnx_path), strongly_typed=plan.strongly_typed)
    cache = str(config.timing_cache) if config.timing_cache else None
    try:
        engine = engine_bytes_from_network(network, create_config(plan, config),
                                           save_timing_cache=cache)
    except PolygraphyException as e:
        raise VispecError(f"graph {plan.name!r}: TensorRT could not build a {plan.precision} "
                          f"engine ({e}). Hint: read the TensorRT log above; try another "
                          f"--precision or a larger --workspace") from e
    engine_path.write_bytes(engine)


def engine_manifest(manifest: Manifest, plans: list[GraphPlan], trt_version: str) -> Manifest:
    """A copy of ``manifest`` whose graphs are the engines, with precision and profiles in
    each spec's meta and the TensorRT version in ``versions``."""
    graphs = {p.name: GraphEntry(f"{p.name}.engine", dataclasses.replace(
        p.spec, meta={**p.spec.meta, "precision": p.precision, "profiles": list(p.profiles)}))
        for p in plans}
    versions = {**manifest.versions, "tensorrt": trt_version,
                "polygraphy": polygraphy.__version__}
    return dataclasses.replace(manifest, graphs=graphs, versions=versions)


def build_engines(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  config: BuildConfig, *, calibration: Mapping[str, Feeds] | None = None,
                  overwrite: bool = False,
                  progress: Callable[[str], None] = lambda msg: None) -> Path:
    """Build ``<graph>.engine`` for every graph of the export at ``artifact_dir`` into
    ``out_dir`` (atomically; an existing ``out_dir`` is replaced only with ``overwrite``),
    with the processor files, host arrays and a manifest.

    For int8, ``calibration`` maps graph names to feed dicts; by default a target's ``lm``
    graph is calibrated on ``config.calibration_prompts``.
    """
    trt = import_tensorrt()  # before anything is read or written
    artifact_dir = Path(artifact_dir)
    manifest = Manifest.load(artifact_dir)
    if calibration is None and config.precision == "int8" and manifest.kind == "target":
        calibration = {"lm": lm_calibration_feeds(artifact_dir, config.calibration_prompts)}
    calibration = dict(calibration or {})
    plans = plan_build(manifest, artifact_dir, config, trt.__version__, calibration)
    with atomic_output_dir(out_dir, overwrite, inputs=[artifact_dir]) as tmp:
        work = tmp / ".qdq"
        for i, plan in enumerate(plans, 1):
            source = plan.onnx
            if plan.name in weight_graphs(manifest.model):
                progress(f"[{i}/{len(plans)}] {plan.name}: weights as INT4 DequantizeLinear")
                work.mkdir(exist_ok=True)
                source = to_dequantize_linear(plan.onnx, work / f"{plan.name}.onnx")
            if plan.precision == "int8":
                progress(f"[{i}/{len(plans)}] {plan.name}: calibrating, writing Q/DQ ONNX")
                work.mkdir(exist_ok=True)
                source = quantize_qdq(plan.onnx, work / f"{plan.name}.onnx",
                                      calibration[plan.name], plan.spec)
            progress(f"[{i}/{len(plans)}] {plan.name}: building {plan.precision} engine, "
                     f"profiles {list(plan.profiles)}")
            build_engine(source, tmp / f"{plan.name}.engine", plan, config)
        shutil.rmtree(work, ignore_errors=True)
        if (artifact_dir / PROCESSOR_DIR).is_dir():
            shutil.copytree(artifact_dir / PROCESSOR_DIR, tmp / PROCESSOR_DIR)
        for file in manifest.extra_files.values():
            shutil.copy2(artifact_dir / file, tmp / file)
        engine_manifest(manifest, plans, trt.__version__).save(tmp)
    progress(f"built {len(plans)} engines into {out_dir}")
    return Path(out_dir)
