"""Export a target VLM to ONNX graphs (embed, vision, lm) plus a manifest, atomically."""
from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import transformers
from PIL import Image

from vispec.runtime.errors import VispecError
from vispec.runtime.families import FamilyGlue, glue_for
from vispec.runtime.head_screen import HEAD_WEIGHTS, SCREEN
from vispec.runtime.manifest import OPSETS, PROCESSOR_DIR, Manifest
from vispec.runtime.model_dir import WEIGHT_PATTERNS, read_config
from vispec.runtime.processors import load_processor
from vispec.runtime.specs import (
    ATTENTION_FORMS,
    GQA,
    LOGITS,
    NEW,
    PAST,
    STANDARD,
    GraphSpec,
    argmax_spec,
    embed_spec,
    head_screen_spec,
    lm_step_spec,
)
from vispec.runtime.weights import BITS, FLOAT, WEIGHTS, require_weights_runtime

from .artifacts import ArtifactInfo, GraphJob, write_artifact
from .families import FamilyExport
from .gptq import calibration_forwards, calibration_prompts, gptq_language_model
from .gqa_lm import check_gqa_model, write_gqa_lm
from .head_screen import head_weight, screens, write_head_screen
from .lm_step import ArgmaxStep, EmbedStep, LMStep
from .loading import DTYPES, load_target
from .onnx_io import example_feeds
from .weight_quant import BLOCK, check_block, quantize_gathers, quantize_matmuls, quantize_minmax

DEFAULT_OPSET = 17
EXAMPLE_NEW, EXAMPLE_PAST = 8, 5  # example dims > 2: the tracer bakes in 1s
WEIGHT_PARTS = ("head", "embed")  # besides the decoder layers: the LM head, the embedding
DEFAULT_EXCLUDE = ("embed",)  # a Gather reads S rows a step: quantizing it saves no time
HEAD_PRECISIONS = ("int8", "int4")  # an LM head quantized with the layers
METHODS = ("rtn", "gptq", "minmax")  # round to nearest; GPTQ on calibration prompts first
# (minutes); int4 min/max per block with a float minimum, the head int8 (exact for GGUF Q4_1/Q8_0)


def copy_processor_files(model_dir: Path, dest: Path) -> None:
    """Copy config, tokenizer, processor and template files (no weights) into ``dest``."""
    dest.mkdir()
    weights = {p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)}
    for f in model_dir.iterdir():
        if f.is_file() and f not in weights and not f.name.endswith(".index.json"):
            shutil.copy2(f, dest / f.name)


def example_images() -> list[Image.Image]:
    """Two small noise images of different shapes, to trace the vision graph."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((56, 56), (56, 84))]


def eos_token_ids(model_dir: Path, glue: FamilyGlue) -> list[int]:
    """The target's end-of-sequence ids (generation config first, else the text config)."""
    gen = transformers.GenerationConfig.from_pretrained(str(model_dir)) \
        if (model_dir / "generation_config.json").exists() else None
    eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else \
        glue.text_config.get("eos_token_id")
    return sorted({eos} if isinstance(eos, int) else set(eos or []))


def read_target_facts(adapter: FamilyExport, glue: FamilyGlue, model_dir: Path) -> dict:
    """Architecture facts the runtime needs, read off the loaded modules and configs."""
    attn = adapter.language_model.layers[0].self_attn
    return {
        "model_type": glue.model_type,
        "num_layers": len(adapter.language_model.layers),
        "hidden_size": glue.hidden_size,
        "vocab_size": adapter.lm_head.out_features,
        "head_dim": attn.head_dim,
        "kv_heads": attn.k_proj.out_features // attn.head_dim,
        "image_token_id": glue.image_token_id,
        "eos_token_ids": eos_token_ids(model_dir, glue),
        "mrope": glue.mrope,
    }


def target_specs(glue: FamilyGlue, facts: dict, max_len: int, max_images: int,
                 dtype: str, attention: str = STANDARD, screen: bool = False
                 ) -> dict[str, GraphSpec]:
    """Graph name -> spec of the target's four graphs, in export order, and its float
    head's greedy screen (``screen``)."""
    specs = {"embed": embed_spec(hidden_size=facts["hidden_size"], max_len=max_len, dtype=dtype),
            "vision": glue.vision_spec(glue.config, max_images),
            "lm": lm_step_spec(num_layers=facts["num_layers"], hidden_size=facts["hidden_size"],
                               vocab_size=facts["vocab_size"], kv_heads=facts["kv_heads"],
                               head_dim=facts["head_dim"], max_len=max_len, mrope=glue.mrope,
                               dtype=dtype, attention=attention),
            "argmax": argmax_spec(vocab_size=facts["vocab_size"], max_len=max_len, dtype=dtype)}
    if screen:
        specs[SCREEN] = head_screen_spec(hidden_size=facts["hidden_size"],
                                         vocab_size=facts["vocab_size"], max_len=max_len)
    return specs


def target_jobs(adapter: FamilyExport, glue: FamilyGlue, processor,
                specs: dict[str, GraphSpec], rewrites: dict[str, tuple]) -> list[GraphJob]:
    """The target's graph jobs: each graph's module, traced on example inputs (a prompt with
    two images for the vision graph), with its weight rewrite if any; an ``lm`` spec of the
    ``gqa`` form is written by ``gqa_lm`` instead, the head's screen by ``head_screen``."""
    example_prompt = glue.prepare(processor, "describe", example_images())
    lm = specs["lm"]
    traced = {"embed": lambda: (EmbedStep(adapter.language_model.embed_tokens),
                                {"input_ids": example_prompt.input_ids[None, :EXAMPLE_NEW]}),
              "vision": lambda: (adapter.vision_module(), glue.vision_feeds(example_prompt)),
              "lm": lambda: (LMStep(adapter.language_model, adapter.lm_head),
                             example_feeds(lm, {NEW: EXAMPLE_NEW, PAST: EXAMPLE_PAST},
                                           np.random.default_rng(0))),
              "argmax": lambda: (ArgmaxStep(), example_feeds(specs["argmax"], {NEW: EXAMPLE_NEW},
                                                             np.random.default_rng(0)))}
    jobs = []
    for name, spec in specs.items():
        rewrite = rewrites.get(name, ())
        if name == "lm" and lm.meta["attention"] == GQA:
            write = functools.partial(write_gqa_lm, adapter.language_model, adapter.lm_head, lm)
            jobs.append(GraphJob(name, None, spec, None, *rewrite, writer=write))
        elif name == SCREEN:
            jobs.append(GraphJob(name, None, spec, None, writer=functools.partial(
                write_head_screen, adapter.lm_head, spec)))
        else:
            module, feeds = traced[name]()
            jobs.append(GraphJob(name, module, spec, feeds, *rewrite))
    return jobs


def write_host_files(folder: Path, *, model_dir: Path, glue: FamilyGlue, model,
                     head=None) -> dict[str, str]:
    """The glue's host-side arrays (``<key>.npy``, returned as the manifest's
    ``extra_files``), ``head``'s float weights where it has a screen, and the processor
    files, written into ``folder``."""
    arrays = dict(glue.extra_arrays(model))
    if head is not None:
        arrays[HEAD_WEIGHTS] = head_weight(head)
    files = {}
    for key, array in arrays.items():
        np.save(folder / f"{key}.npy", array)
        files[key] = f"{key}.npy"
    copy_processor_files(model_dir, folder / PROCESSOR_DIR)
    return files


def check_max_len(glue: FamilyGlue, max_len: int) -> None:
    """Refuse a cache longer than a sliding attention window (not implemented in the graph)."""
    text = glue.text_config
    window = text.get("sliding_window")
    if window and text.get("use_sliding_window", True) and max_len > window:
        raise VispecError(f"--max-len {max_len} exceeds the model's sliding attention window "
                          f"({window}); the exported graph attends to the whole cache, which "
                          f"is exact only within the window. Hint: export with --max-len "
                          f"<= {window}")


def check_attention(attention: str, glue: FamilyGlue, dtype: str) -> None:
    """Refuse an LM graph form that does not exist or cannot express this model."""
    if attention not in ATTENTION_FORMS:
        raise VispecError(f"attention {attention!r}. Expected one of {ATTENTION_FORMS}")
    if attention == GQA:
        check_gqa_model(glue.text_config, glue.mrope, dtype)


def check_weights(weights: str, block: int, exclude: tuple[str, ...], method: str = "rtn",
                  head: str | None = None) -> None:
    """Refuse a weight precision, block size, excluded part, method or head precision that
    does not exist or does not fit the others."""
    if weights not in WEIGHTS:
        raise VispecError(f"weights {weights!r}. Expected one of {WEIGHTS}")
    if method not in METHODS:
        raise VispecError(f"weights method {method!r}. Expected one of {METHODS}")
    if method == "minmax" and weights not in ("int4", FLOAT):
        raise VispecError(f"weights method 'minmax' with weights {weights!r}. Expected int4 "
                          f"(4-bit min/max blocks; int8 is symmetric). Hint: --weights int4, or "
                          f"--weights-method rtn for int8")
    check_block(block)
    unknown = set(exclude) - set(WEIGHT_PARTS)
    if unknown:
        raise VispecError(f"weights exclude {sorted(unknown)}. Expected some of {WEIGHT_PARTS}")
    if head is not None:
        if head not in HEAD_PRECISIONS:
            raise VispecError(f"head weights {head!r}. Expected one of {HEAD_PRECISIONS}")
        if weights == FLOAT or "head" in exclude:
            why, fix = (("float weights", "pass --weights int4/int8") if weights == FLOAT
                        else ("the head excluded", "drop head from --weights-exclude"))
            raise VispecError(f"head weights {head} with {why}: nothing quantizes the head. "
                              f"Hint: drop --weights-head, or {fix}")
    require_weights_runtime(weights, "ort", f"export --weights {weights}")


def head_weights(weights: str, method: str, head: str | None = None) -> str:
    """The LM head's precision: ``head``, else the method's default (int8 on zero-point
    grids, ``zero_point_grid``; the layers' otherwise)."""
    return head or ("int8" if zero_point_grid(weights, method) else weights)


def zero_point_grid(weights: str, method: str) -> bool:
    """Whether the LM's 4-bit weights are min/max with zero points (``minmax``, and ``gptq``
    at int4: the head and the embedding table int8) rather than symmetric."""
    return weights == "int4" and method in ("minmax", "gptq")


def weight_rewrites(weights: str, block: int, exclude: tuple[str, ...],
                    method: str = "rtn", head: str | None = None
                    ) -> dict[str, tuple[Callable[[Path], object], str]]:
    """Graph name -> (rewrite of its exported file, progress note) quantizing the ``lm``
    graph's MatMuls (its LM head unless excluded) and the ``embed`` graph's table (unless
    excluded) (``weight_quant``); none for float weights. ``minmax``: the decoder's MatMuls
    4-bit min/max, the embedding table int8 (symmetric, ``max |w| / 127``); ``gptq`` at
    int4 the same with no float part (GPTQ's grid has integer zero points). The head at
    ``head_weights``: int8 symmetric, or int4 as the layers are rounded (min/max on the
    zero-point grids)."""
    if weights == FLOAT:
        return {}
    keep = (LOGITS,) if "head" in exclude else ()
    zero_points = zero_point_grid(weights, method)
    bits = 8 if zero_points else BITS[weights]  # the table's
    head = head_weights(weights, method, head)
    if zero_points:
        lm = functools.partial(quantize_minmax, block=block, keep=keep,
                               int8=(LOGITS,) if head == "int8" and not keep else (),
                               **({"digits": 0} if method == "gptq" else {}))
    elif head == weights or keep:
        lm = functools.partial(quantize_matmuls, bits=bits, block=block, keep=keep)
    else:  # the layers, then the head alone
        lm = functools.partial(_layers_then_head, bits=bits, head_bits=BITS[head], block=block)
    note = ", LM head float" if keep else f", LM head {head}"
    rewrites = {"lm": (lm, f"quantizing the LM's weights to {weights} (blocks of {block}{note}"
                           f"{', ' + method if zero_points else ''})")}
    if "embed" not in exclude:
        rewrites["embed"] = (functools.partial(quantize_gathers, bits=bits, block=block),
                             f"quantizing the embedding table to int{bits} (blocks of {block})")
    return rewrites


def _layers_then_head(path: Path, bits: int, head_bits: int, block: int) -> Path:
    """Round-to-nearest rewrite of ``path``: the decoder's MatMuls at ``bits``, the LM head
    at ``head_bits``."""
    quantize_matmuls(path, bits=bits, block=block, keep=(LOGITS,))
    return quantize_matmuls(path, bits=head_bits, block=block)


def check_opset(opset: int) -> None:
    """Refuse an ONNX opset the graphs cannot be exported in."""
    if opset not in OPSETS:
        raise VispecError(f"opset {opset}. Expected {OPSETS.start}..{OPSETS.stop - 1} (attention "
                          f"needs {OPSETS.start}). Hint: leave --opset at its default, "
                          f"{DEFAULT_OPSET}")


def export_target(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  max_len: int = 1024, max_images: int = 4, opset: int = DEFAULT_OPSET,
                  dtype: str = "float32", attention: str = STANDARD, weights: str = FLOAT,
                  weights_block: int = BLOCK,
                  weights_exclude: tuple[str, ...] = DEFAULT_EXCLUDE, weights_method: str = "rtn",
                  weights_head: str | None = None,
                  calibration: str | os.PathLike | None = None, overwrite: bool = False,
                  progress: Callable[[str], None] = lambda msg: None) -> Manifest:
    """Export the target at ``model_dir`` into ``out_dir``: ``embed.onnx``, ``vision.onnx``,
    ``lm.onnx``, ``argmax.onnx`` (greedy choice on the device), for a float ``gqa`` LM the
    head's greedy screen ``screen.onnx`` (``head_screen``), host-side arrays, the
    processor files and ``manifest.json``.

    ``dtype`` is the precision of the embed and LM graphs and of the KV cache (``float16``
    for fp16 engines on strongly typed TensorRT 11, or the ORT CUDA provider).
    ``attention`` ``gqa``: the LM graph in ONNX Runtime's fused CPU form (``gqa_lm``) instead
    of standard ops (TensorRT, any provider).
    ``weights`` ``int4``/``int8``: the LM's weights quantized weight-only, blocks of
    ``weights_block`` (``weight_rewrites``); ``weights_exclude`` keeps the LM ``head``
    and/or the ``embed`` table float (default: the embedding). ``weights_method="gptq"``
    rounds the LM's weights with GPTQ first (``gptq``), calibrated on the prompts of
    ``calibration`` (a file) or a built-in set; at int4 onto min/max blocks with integer
    zero points, the head and embedding int8. ``weights_method="minmax"`` (int4): 4-bit
    min/max blocks with a float minimum, the head and embedding int8 (``weight_quant``).
    ``weights_head`` ``int8``/``int4``: the LM head's precision instead of the method's
    (int4 on the zero-point grids: rounded min/max, not by GPTQ).
    """
    if dtype not in DTYPES:
        raise VispecError(f"dtype {dtype!r} is not supported. Expected one of {sorted(DTYPES)}")
    weights_exclude = tuple(weights_exclude)
    check_weights(weights, weights_block, weights_exclude, weights_method, weights_head)
    if weights_method == "gptq" and weights != FLOAT:
        calibration = calibration_prompts(calibration)
    model_dir = Path(model_dir)
    start = time.perf_counter()
    check_opset(opset)
    glue = glue_for(read_config(model_dir))
    check_max_len(glue, max_len)
    check_attention(attention, glue, dtype)
    processor = load_processor(model_dir)  # before the weights: a missing tokenizer is cheap
    adapter, glue = load_target(model_dir, dtype)
    facts = {**read_target_facts(adapter, glue, model_dir), "dtype": dtype,
             "attention": attention, "weights": weights}
    if weights != FLOAT:
        facts.update(weights_block=weights_block, weights_exclude=sorted(weights_exclude),
                     weights_method=weights_method)
        if "head" not in weights_exclude:
            facts["weights_head"] = weights_head = head_weights(weights, weights_method,
                                                                weights_head)
    if weights_method == "gptq" and weights != FLOAT:
        prompts = [glue.prepare(processor, text, images) for text, images in calibration]
        progress(f"GPTQ: calibrating on {len(prompts)} prompts and the model's answers")
        zero_points = zero_point_grid(weights, weights_method)
        head_gptq = not ("head" in weights_exclude or zero_points  # the head rounded apart
                         or weights_head != weights)
        gptq_language_model(adapter.language_model, adapter.lm_head if head_gptq else None,
                            calibration_forwards(adapter, glue, prompts), BITS[weights],
                            weights_block, zero_points, progress)
    screen = screens(adapter.lm_head, attention, weights)
    jobs = target_jobs(adapter, glue, processor,
                       target_specs(glue, facts, max_len, max_images, dtype, attention, screen),
                       weight_rewrites(weights, weights_block, weights_exclude, weights_method,
                                       weights_head))
    info = ArtifactInfo(kind="target", family=glue.model_type, source=model_dir,
                        max_len=max_len, opset=opset, model=facts)
    return write_artifact(out_dir, info, jobs, inputs=[model_dir], overwrite=overwrite,
                          extras=functools.partial(write_host_files, model_dir=model_dir,
                                                   glue=glue, model=adapter.model,
                                                   head=adapter.lm_head if screen else None),
                          started=start, progress=progress)
