"""``vispec-export``: a thin shell over the Python API (see README for both).

Heavy imports (torch for export/validate) happen inside the commands, so ``generate``
runs on a machine without torch.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from vispec.runtime.atomic import check_output_dir
from vispec.runtime.cli import bench, generate, serve, triton_repo
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import OPSETS
from vispec.runtime.specs import ATTENTION_FORMS, STANDARD
from vispec.runtime.weights import WEIGHTS

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C, as a shell reports it
POSITIVE = click.IntRange(min=1)


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


class BadInput(click.ClickException):
    """A :class:`VispecError` raised inside a command, shown like click's usage errors."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, command_path: str):
        super().__init__(message)
        self.command_path = command_path


def _error_line(e: click.ClickException, default_path: str) -> str:
    """``error: <message> Hint: ...`` (a pointer to the command's help if it has no hint)."""
    ctx = getattr(e, "ctx", None)
    path = getattr(e, "command_path", None) or (ctx.command_path if ctx else default_path)
    message = e.format_message()
    return f"error: {message}" if "Hint:" in message else \
        f"error: {message} Hint: see `{path} --help`"


class VispecGroup(click.Group):
    """The command group: every bad input, click's usage errors included, ends as one
    ``error: ... Hint: ...`` line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VispecError as e:
            raise BadInput(str(e), f"{ctx.command_path} {ctx.invoked_subcommand}") from e

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # the help text, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(_error_line(e, prog_name or self.name), err=True)
            sys.exit(e.exit_code)
        except click.Abort as e:  # click's wrapper of Ctrl-C (and of EOF at a prompt)
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_INTERRUPTED if isinstance(e.__cause__, KeyboardInterrupt) else 1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _check_output(out_dir: Path, overwrite: bool, *inputs: Path | None) -> None:
    """Refuse a bad output folder before anything heavy is loaded."""
    check_output_dir(out_dir, overwrite, [i for i in inputs if i is not None])


@click.group(cls=VispecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vispec-export", prog_name="vispec-export")
def cli():
    """Export VLM targets and speculative drafters to ONNX/TensorRT, and run them.

    Typical flow: export -> validate -> build (TensorRT) -> generate / bench.
    """


cli.add_command(generate)
cli.add_command(bench)
cli.add_command(serve)
cli.add_command(triton_repo)


OVERWRITE = click.option("--overwrite", is_flag=True,
                         help="Replace OUT_DIR if it is an earlier output of vispec-export.")
OPSET = click.option("--opset", type=click.IntRange(OPSETS.start, OPSETS.stop - 1), default=17,
                     show_default=True, help="ONNX opset of the graphs.")


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--max-len", type=POSITIVE, default=1024, show_default=True,
              help="KV-cache length the graphs (and engine profiles) are sized for.")
@click.option("--max-images", type=POSITIVE, default=4, show_default=True,
              help="Images per prompt.")
@OPSET
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Precision of the embed/LM graphs and the KV cache.")
@click.option("--attention", type=click.Choice(list(ATTENTION_FORMS)), default=STANDARD,
              show_default=True,
              help="LM graph form: standard ONNX ops (TensorRT and every ONNX Runtime "
                   "provider), or gqa: ONNX Runtime's fused CPU kernels (GroupQueryAttention, "
                   "KV written in place; fastest on a CPU, float32, not for TensorRT).")
@click.option("--weights", type=click.Choice(list(WEIGHTS)), default="float32",
              show_default=True,
              help="Weight-only blockwise quantization of the LM (ONNX Runtime CPU; `build` "
                   "takes int4 with --weights-block 64/128 for TensorRT).")
@click.option("--weights-block", type=click.Choice(["32", "64", "128"]), default="32",
              show_default=True, help="Weights per quantization scale (along the input). "
                                      "64: ONNX Runtime's int4 steps ~10-15% faster than 32 "
                                      "(with gptq about as accurate).")
@click.option("--weights-exclude", default="embed", show_default=True,
              help="Parts kept float, comma-separated: head (the LM head), embed (the token "
                   "embedding); 'none' quantizes both.")
@click.option("--weights-method", type=click.Choice(["rtn", "gptq", "minmax"]), default="rtn",
              show_default=True, help="Round to nearest, GPTQ on calibration prompts "
                                      "(minutes; more accurate; int4: blocks with integer "
                                      "zero points, the head int8), or (int4) min/max per block "
                                      "with zero points and the float part in a 4-bit digit, "
                                      "the head int8 (GGUF Q4_1/Q8_0 weights kept).")
@click.option("--weights-head", type=click.Choice(["int8", "int4"]), default=None,
              help="The LM head's precision (default: the method's, int8 for gptq/minmax at "
                   "int4, else --weights). int4 on gptq/minmax: rounded min/max with zero "
                   "points, ~5% faster int4 decoding, text a little further from float.")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="GPTQ prompts, one per line (image files, each followed by "
                                 "a TAB, may lead a line). Default: a built-in set.")
@OVERWRITE
def export(model_dir, out_dir, max_len, max_images, opset, dtype, attention, weights,
           weights_block, weights_exclude, weights_method, weights_head, calibration, overwrite):
    """Export the target VLM in MODEL_DIR (a local Hugging Face folder: LLaVA-1.5,
    LLaVA-1.6 or Qwen2.5-VL) to ONNX graphs + manifest.json in OUT_DIR."""
    _check_output(out_dir, overwrite, model_dir)
    from .export import export_target
    exclude = tuple(p.strip() for p in weights_exclude.split(",") if p.strip() not in ("", "none"))
    export_target(model_dir, out_dir, max_len=max_len, max_images=max_images, opset=opset,
                  dtype=dtype, attention=attention, weights=weights,
                  weights_block=int(weights_block),
                  weights_exclude=exclude, weights_method=weights_method,
                  weights_head=weights_head, calibration=calibration, overwrite=overwrite,
                  progress=_progress)


@cli.command("export-drafter")
@click.argument("drafter_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--target", "target_dir", required=True, type=click.Path(path_type=Path),
              help="The target's local Hugging Face folder (LM head, sizes, config hash).")
@click.option("--top-k", type=POSITIVE, default=10, show_default=True,
              help="Width of the fused top-k output (>= the tree's top_k at run time).")
@click.option("--max-len", type=POSITIVE, default=1024, show_default=True)
@OPSET
@click.option("--draft-vocab", type=POSITIVE, default=None,
              help="Keep only this many target tokens in the drafter's head (the most frequent "
                   "of --vocab-corpus, else of the drafter's token_counts.json from "
                   "train-drafter); drafting gets cheaper, output stays exact. Default: all.")
@click.option("--vocab-corpus", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="UTF-8 text whose token frequencies choose --draft-vocab.")
@click.option("--weights", type=click.Choice(list(WEIGHTS)), default="float32",
              show_default=True,
              help="int8/int4: the draft graph's weights in 8/4 bits for ONNX Runtime on CPU "
                   "(drafter calls ~1.7x cheaper at int8, int4 ~3% faster decoding again on "
                   "the demo's int4 image prompts; output stays exact). TensorRT needs float32 "
                   "(it builds its own fp16/int8).")
@OVERWRITE
def export_drafter(drafter_dir, out_dir, target_dir, top_k, max_len, opset, draft_vocab,
                   vocab_corpus, weights, overwrite):
    """Export a ViSpec, HiViS or EAGLE drafter checkpoint (official layout: config.json +
    pytorch_model.bin or model.safetensors; the type is detected from its keys) to ONNX
    graphs (draft, adaptor) + manifest.json in OUT_DIR."""
    _check_output(out_dir, overwrite, drafter_dir, target_dir)
    from .drafters.export import export_drafter as run
    if vocab_corpus is not None and draft_vocab is None:
        raise click.UsageError("--vocab-corpus chooses the tokens of --draft-vocab N; give both.")
    run(drafter_dir, target_dir, out_dir, top_k=top_k, max_len=max_len, opset=opset,
        draft_vocab=draft_vocab, vocab_corpus=vocab_corpus, weights=weights, overwrite=overwrite,
        progress=_progress)


@cli.command("train-drafter")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["vispec", "hivis", "eagle"]), default=None,
              help="Drafter type of a new drafter (detected from --init otherwise).")
@click.option("--init", "init_dir", type=click.Path(path_type=Path), default=None,
              help="Continue from this drafter checkpoint (official layout).")
@click.option("--data", "data_dirs", type=click.Path(path_type=Path, exists=True, file_okay=False),
              multiple=True, help="Train on this distill-data folder; repeat to train on "
                                  "several (else on --sequences continuations of random "
                                  "prompts decoded now).")
@click.option("--steps", default=1000, show_default=True)
@click.option("--batch", default=4, show_default=True,
              help="Sequences per optimiser step, over all processes together.")
@click.option("--sequences", default=512, show_default=True,
              help="Target continuations decoded as training data (without --data).")
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--vocab", type=click.IntRange(min=0), default=0, show_default=True,
              help="The logit loss over the N most frequent answer tokens only (0: all); "
                   "export with --draft-vocab <= N. Steps get several times cheaper.")
@click.option("--unroll", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tree levels trained per row: 1 teacher-forced only; N also levels 1..N-1 "
                   "drafted from the drafter's own hidden states, as the runtime drafts "
                   "(training-time test: deeper drafts accepted; steps ~N times dearer).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="auto: bf16 autocast on CUDA (fp16 without bf16), fp32 "
                                      "on the CPU.")
@click.option("--save-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="Steps between saves of the resumable training state (0: never).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where the resumable state lives (default: .OUT_DIR.train-state beside "
                   "OUT_DIR); rerun the same command after a kill to resume.")
@OVERWRITE
def train_drafter(model_dir, out_dir, kind, init_dir, data_dirs, steps, batch, sequences, lr, seed,
                  vocab, unroll, precision, save_every, state_dir, overwrite):
    """Train a drafter for the target in MODEL_DIR by self-distillation (the target's own
    answers: a distill-data folder, or continuations of synthetic prompts) and write it to
    OUT_DIR in the official layout. Runs unchanged under `torchrun --nproc_per_node N` and
    `accelerate launch` (DistributedDataParallel: gloo on CPU, nccl on GPUs)."""
    if kind is None and init_dir is None:
        raise click.UsageError("give --kind for a new drafter or --init to continue one.")
    _check_output(out_dir, overwrite, model_dir, init_dir, *data_dirs)
    from .drafters.train import RunOptions, TrainConfig
    from .drafters.train import train_drafter as run
    try:
        config = TrainConfig(steps=steps, sequences=sequences, lr=lr, seed=seed, batch=batch,
                             vocab=vocab, unroll=unroll)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    run(model_dir, out_dir, kind=kind, init_dir=init_dir, config=config, data=list(data_dirs) or None,
        options=RunOptions(state_dir, save_every, precision), overwrite=overwrite,
        progress=_progress)


@cli.command("distill-data")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="UTF-8 file, one prompt per line (default: the built-in set).")
@click.option("--text-prompts", type=click.IntRange(min=0), default=256, show_default=True,
              help="Without --prompts: how many built-in prompts (instructions of many kinds "
                   "and questions the target writes for itself).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="A folder of pictures, each asked for a short and a detailed description.")
@click.option("--synthetic-images", type=click.IntRange(min=0), default=0, show_default=True,
              help="The demo's synthetic pictures of coloured shapes, asked the same.")
@click.option("--max-new-tokens", type=POSITIVE, default=192, show_default=True,
              help="Answer budget of text prompts.")
@click.option("--image-tokens", type=POSITIVE, default=64, show_default=True,
              help="Answer budget of image prompts.")
@click.option("--batch", type=POSITIVE, default=16, show_default=True,
              help="Prompts generated together (and per chunk file).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--overwrite", is_flag=True,
              help="Start over in OUT_DIR if it holds a run of other settings.")
def distill_data(model_dir, out_dir, prompts_file, text_prompts, images_dir, synthetic_images,
                 max_new_tokens, image_tokens, batch, seed, overwrite):
    """Generate the target's own greedy answers (batched PyTorch generation) with the inputs
    a drafter trains on, into OUT_DIR (chunk files). Under `torchrun --nproc_per_node N` or
    `accelerate launch` each process writes its own chunks; rerun the same command after a
    kill to finish: nothing is lost or written twice. Train on it with `train-drafter --data`."""
    from .drafters.distill import DistillDataConfig, read_prompts
    from .drafters.distill import distill_data as run
    config = DistillDataConfig(text_prompts=text_prompts, synthetic_images=synthetic_images,
                               max_new_tokens=max_new_tokens, image_tokens=image_tokens,
                               batch=batch, seed=seed)
    prompts = read_prompts(prompts_file) if prompts_file is not None else None
    run(model_dir, out_dir, config, prompts=prompts, images_dir=images_dir, overwrite=overwrite,
        progress=_progress)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--drafter", "drafter_dir", type=click.Path(path_type=Path), default=None,
              help="Drafter checkpoint folder, to validate its graphs too.")
@click.option("--drafter-artifacts", type=click.Path(path_type=Path), default=None,
              help="The drafter's exported folder (with --drafter).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random tree case.")
@click.option("--max-new-tokens", type=POSITIVE, default=16, show_default=True,
              help="Length of the greedy identity check against model.generate.")
def validate(model_dir, artifact_dir, drafter_dir, drafter_artifacts, seed, max_new_tokens):
    """Compare ARTIFACT_DIR's graphs with the PyTorch model in MODEL_DIR.

    Prints one row per graph output and case (prefill, decode, random tree), and checks
    that greedy generation is token-identical to model.generate. Exit 1 on a failure.
    """
    if (drafter_dir is None) != (drafter_artifacts is None):
        raise click.UsageError("--drafter and --drafter-artifacts go together.")
    from .report import print_parity, validate_all
    rows, greedy = validate_all(model_dir, artifact_dir, seed=seed,
                                max_new_tokens=max_new_tokens, progress=_progress)
    if drafter_dir is not None:
        from .drafters.export import validate_drafter
        rows += validate_drafter(drafter_dir, model_dir, drafter_artifacts, seed=seed)
    ok = print_parity(rows, greedy)
    raise SystemExit(0 if ok else 1)


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path), default="demo_out")
@click.option("--tiny", is_flag=True,
              help="A tiny random model built here (seconds) instead of the SmolLM2 target.")
@click.option("--family", type=click.Choice(["llava", "llava_next", "qwen2_5_vl"]),
              default="llava", show_default=True, help="With --tiny: the tiny model's family.")
@click.option("--drafter", "drafter_kind", type=click.Choice(["vispec", "hivis", "eagle"]),
              default="vispec", show_default=True, help="With --tiny: the drafter trained.")
@click.option("--train", is_flag=True,
              help="Train short ViSpec/HiViS/EAGLE drafters here (cached; ~20 min on 2 cores) "
                   "instead of loading the shipped ones.")
@OVERWRITE
def demo(out_dir, tiny, family, drafter_kind, train, overwrite):
    """End-to-end demo on SmolLM2-135M-Instruct with a trained vision tower (LLaVA-1.5):
    export, validate against PyTorch, the shipped ViSpec/HiViS/EAGLE drafters (--train:
    short ones self-distilled here), plain vs speculative decoding timed as `bench` times
    it, speed table and chart. --tiny: the same flow on a tiny random model. Exit 1 if a
    check fails."""
    _check_output(out_dir, overwrite)
    from .demo.run import run_demo
    ok = run_demo(out_dir, tiny=tiny, family=family, drafter_kind=drafter_kind, train=train,
                  overwrite=overwrite, progress=_progress)
    raise SystemExit(0 if ok else 1)


@cli.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp16", "int8", "fp32"]), default="fp16",
              show_default=True, help="int8 inserts explicit Q/DQ first (TensorRT 10.3+).")
@click.option("--workspace-mib", type=POSITIVE, default=None,
              help="TensorRT builder workspace limit (default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Reuse and update this TensorRT timing cache file (faster rebuilds).")
@click.option("--profiles", default="decode=64,prefill", show_default=True,
              help="Optimization profiles of the LM engine, split by new-token count: "
                   "name=upper bound, the last one unbounded ('' for one profile).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="int8: prompts (one per line) whose activations set the Q/DQ scales "
                   "(default: a built-in set).")
@OVERWRITE
def build(artifact_dir, out_dir, precision, workspace_mib, timing_cache, profiles, calibration,
          overwrite):
    """Build TensorRT engines for every graph in ARTIFACT_DIR into OUT_DIR (needs
    TensorRT on this machine: run it on the target GPU, e.g. the Jetson itself)."""
    _check_output(out_dir, overwrite, artifact_dir)
    from vispec.engines.build import BuildConfig, build_engines
    config = BuildConfig.from_cli(precision, workspace_mib, timing_cache, profiles, calibration)
    build_engines(artifact_dir, out_dir, config, overwrite=overwrite, progress=_progress)


def exit_on_sigterm() -> None:
    """Let SIGTERM unwind the stack (exit code 143), so temporary output folders are
    removed on the way out, as on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main() -> None:
    exit_on_sigterm()
    cli(prog_name="vispec-export")


if __name__ == "__main__":
    sys.exit(main())
