"""The runtime's commands, ``generate``, ``bench``, ``serve`` and ``triton-repo``: no torch
is imported or needed. The exporter's CLI (``vispec-export``) mounts them beside its own.

With torch installed, transformers would import it (seconds) just to build a processor;
these commands hide it from transformers, as on a machine without torch.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from vispec.runtime.atomic import check_writable
from vispec.runtime.drafter_specs import ADAPTOR, IMAGE_INPUTS
from vispec.runtime.errors import VispecError
from vispec.runtime.lookup import LOOKUP

POSITIVE = click.IntRange(min=1)
BENCH_PROMPTS = ("Describe the picture in detail.", "What is in the picture?",
                 "Tell me a short story about a child and a bird.")


def hide_torch() -> None:
    """Make transformers in this process see no torch/torchvision (processors then import
    in ~1 s instead of ~4 s), unless torch is imported already; and keep transformers'
    "PyTorch was not found" notice off the screen."""
    if "torch" not in sys.modules:
        for name in ("torch", "torchvision"):
            sys.modules.setdefault(name, None)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


def _tree_setting(total_tokens, depth, top_k):
    """The tree fields given (``tree_policy.TreeSetting``), or ``"auto"`` when none was."""
    if total_tokens is None and depth is None and top_k is None:
        return "auto"
    return total_tokens, depth, top_k


def _writable_file(path: Path | None, suffix: str | None = None) -> None:
    """Refuse, before any work, an output file (named ``*suffix``) the command could not
    write at the end."""
    if path is None:
        return
    if suffix is not None and path.suffix.lower() != suffix:
        raise VispecError(f"cannot write {path}: the file is written as {suffix}, so its name "
                          f"must end in {suffix}. Hint: pass e.g. {path.with_suffix(suffix)}")
    if not path.parent.is_dir():
        raise VispecError(f"cannot write {path}: {path.parent} is not a folder. Hint: "
                          f"create it or pass another path")
    check_writable(path if path.exists() else path.parent, path)


def _images(paths) -> list:
    """The images as RGB, read before any model is loaded (a bad file fails at once)."""
    hide_torch()
    from vispec.runtime.pipeline import load_image
    return [load_image(p) for p in paths]


def _pipeline(model, drafter, backend, threads, sampling=None, image_input=ADAPTOR,
              tree="auto", keep_spinning=None, exact=False, lookup=LOOKUP):
    hide_torch()
    from vispec.runtime.pipeline import Pipeline
    from vispec.runtime.sampling import Sampling
    return Pipeline(model, drafter_dir=drafter, backend=backend, threads=threads,
                    tree=tree, sampling=sampling or Sampling(), drafter_image_input=image_input,
                    progress=_progress, keep_spinning=keep_spinning, exact=exact, lookup=lookup)


def _mode(pipe, result) -> str:
    """``plain``, or the drafter and the tree(s) its rounds used."""
    if pipe.drafter is None:
        return "plain"
    if pipe.tree != "auto":
        from vispec.runtime.tree import tree_name
        trees = ", ".join(tree_name(t) for t in pipe.tree_policy().trees)
        return f"speculative ({pipe.drafter.kind}, tree {trees})"
    used = result.stats.rounds_per_tree().items()
    rounds = ", ".join(f"{k}: {v}" for k, v in used) or "no decode pass"
    return f"speculative ({pipe.drafter.kind}, tree auto; rounds per tree: {rounds})"


def _stats_line(mode: str, s) -> str:
    head = f"[{mode}] {s.new_tokens} tokens, time to first token {s.prefill_seconds:.3f} s"
    if not s.rounds:
        return f"{head}, no decode pass"
    return (f"{head}, {s.tokens_per_second:.1f} tok/s decode, {s.target_passes} target passes "
            f"(prefill included), {s.mean_accepted:.2f} tokens per decode pass (bonus included)")


@click.command()
@click.option("--model", "model", required=True, type=click.Path(path_type=Path),
              help="Target artifact folder (from `export`, or engines from `build`).")
@click.option("--prompt", required=True, help="User message.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image file; repeat for several.")
@click.option("--drafter", type=click.Path(path_type=Path), default=None,
              help="Drafter artifact folder (from `export-drafter`): speculative decoding.")
@click.option("--drafter-image-input", type=click.Choice(IMAGE_INPUTS), default=ADAPTOR,
              show_default=True, help="What a ViSpec drafter sees of an image: adaptor rows, "
                                      "or the official LLaVA-1.5 inference's <image> tokens.")
@click.option("--no-draft", is_flag=True, help="Plain decoding through the same runtime.")
@click.option("--max-new-tokens", type=POSITIVE, default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible runs).")
@click.option("--total-tokens", type=POSITIVE, default=None,
              help="Fixed draft tree size incl. root. Without any of --total-tokens/--depth/"
                   "--top-k the tree is 'auto': fitted to this machine's measured costs "
                   "(once per artifacts and machine, cached) and the acceptance seen.")
@click.option("--depth", type=POSITIVE, default=None, help="Fixed draft tree depth.")
@click.option("--top-k", type=POSITIVE, default=None, help="Children per expanded node.")
@click.option("--backend", type=click.Choice(["ort", "ort-cuda", "tensorrt"]), default="ort",
              show_default=True)
@click.option("--threads", type=POSITIVE, default=None, help="CPU threads per graph.")
@click.option("--exact", is_flag=True,
              help="Speculative output bit-identical to plain on quantized targets too: "
                   "passes of even row counts, chain trees only (int4 plain steps ~15%% "
                   "slower).")
@click.option("--lookup", type=click.IntRange(min=0), default=LOOKUP, show_default=True,
              help="Greedy rounds also verify up to this many tokens that followed the latest "
                   "earlier occurrence of the conversation's last words (0: off).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the reply and its statistics (per round too) as one JSON object "
                   "instead of streaming text.")
@click.option("--stats-json", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the statistics, per round too, to this JSON file.")
def generate(model, prompt, images, drafter, drafter_image_input, no_draft, max_new_tokens,
             temperature, top_p, seed, total_tokens, depth, top_k, backend, threads,
             exact, lookup, as_json, stats_json):
    """Generate a reply with the runtime (no torch needed), streaming it as tokens are
    accepted, then print speed statistics on stderr: time to first token, decode tokens/s,
    target passes (prefill included) and mean tokens per decode pass (accepted drafts +
    the bonus token; 1.00 for plain decoding)."""
    if drafter is not None and no_draft:
        raise click.UsageError("--drafter and --no-draft exclude each other.")
    _writable_file(stats_json)
    from vispec.runtime.sampling import Sampling
    try:
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    pictures = _images(images)
    pipe = _pipeline(model, drafter, backend, threads, sampling, drafter_image_input,
                     _tree_setting(total_tokens, depth, top_k), exact=exact, lookup=lookup)
    streamer = None
    if not as_json:
        from vispec.runtime.streaming import TextStreamer
        streamer = TextStreamer(pipe.target.processor.tokenizer,
                                lambda piece: click.echo(piece, nl=False))
    result = pipe.generate(prompt, images=pictures, max_new_tokens=max_new_tokens,
                           on_tokens=streamer)
    mode = _mode(pipe, result)
    stats = {"mode": mode, **result.stats.to_dict()}
    if stats_json is not None:
        stats_json.write_text(json.dumps(stats, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps({"text": result.text, "tokens": result.tokens, **stats}))
        return
    streamer.flush()
    click.echo()
    click.echo(_stats_line(mode, result.stats), err=True)


def _parse_trees(value: str):
    from vispec.runtime.tree import TreeConfig
    trees = []
    for item in value.split(","):
        try:
            trees.append(TreeConfig(*(int(x) for x in item.split(":"))))
        except (TypeError, ValueError) as e:
            raise click.BadParameter(f"{item!r}: {e}. Expected total:depth:top_k items "
                                     f"separated by commas, e.g. 8:2:3,16:3:4") from None
    return trees


@click.command()
@click.option("--model", "model", required=True, type=click.Path(path_type=Path),
              help="Target artifact folder.")
@click.option("--drafter", required=True, type=click.Path(path_type=Path),
              help="Drafter artifact folder.")
@click.option("--prompt", "prompts", multiple=True,
              help="User message; repeat for several (default: three built-in prompts).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image attached to every prompt; repeat for several.")
@click.option("--trees", default="4:2:2,8:2:3,16:3:4,30:3:8", show_default=True,
              help="Fixed trees to compare, total:depth:top_k separated by commas.")
@click.option("--max-new-tokens", type=POSITIVE, default=64, show_default=True)
@click.option("--repeats", type=POSITIVE, default=3, show_default=True,
              help="Timed passes over all settings and prompts (after one warm-up pass).")
@click.option("--backend", type=click.Choice(["ort", "ort-cuda", "tensorrt"]), default="ort",
              show_default=True)
@click.option("--threads", type=POSITIVE, default=None, help="CPU threads per graph.")
@click.option("--png", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write a chart (tokens/s and tokens per pass against tree size) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead.")
def bench(model, drafter, prompts, images, trees, max_new_tokens, repeats, backend, threads,
          png, as_json):
    """Plain vs speculative decoding (each fixed tree and 'auto') on the same artifacts,
    interleaved in one warm process with a warm-up pass and repeats; greedy outputs are
    checked against plain decoding."""
    trees = _parse_trees(trees)
    _writable_file(png, ".png")
    pictures = _images(images)
    pipe = _pipeline(model, drafter, backend, threads)
    from vispec.runtime.bench import format_table, plot, run_bench
    rows = run_bench(pipe, [(p, pictures) for p in prompts or BENCH_PROMPTS], trees,
                     max_new_tokens=max_new_tokens, repeats=repeats, progress=_progress)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows]))
    else:
        click.echo(format_table(rows))
    if png is not None:
        click.echo(f"chart: {plot(rows, png, title=f'{pipe.drafter.kind} on {model}')}",
                   err=True)


def _extra(module: str, extra: str) -> None:
    """Refuse, with the install line, a command whose optional extra is missing."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise VispecError(f"this command needs {module!r}, which is not installed. Hint: "
                          f"pip install 'vispec-export[{extra}]'")


@click.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--drafter", type=click.Path(path_type=Path), default=None,
              help="Drafter artifact folder: speculative decoding (per request: "
                   "\"speculative\": false decodes plainly).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback by default; put a proxy with TLS in front "
                   "before binding others).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=POSITIVE, default=1, show_default=True,
              help="Pipelines (each its own KV caches) generating in parallel.")
@click.option("--queue", type=click.IntRange(min=0), default=8, show_default=True,
              help="Requests that may wait for a worker; one more gets 429.")
@click.option("--api-key", envvar="VISPEC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (or set VISPEC_API_KEY).")
@click.option("--allow-local-images", is_flag=True,
              help="Accept image_url parts naming files on this machine.")
@click.option("--model-name", default=None, help="Model id clients send (default: the "
                                                 "ARTIFACTS folder's name).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0,
              show_default=True, help="Seconds requests in flight get after SIGTERM.")
@click.option("--total-tokens", type=POSITIVE, default=None,
              help="Fixed draft tree (with --depth, --top-k); default 'auto'.")
@click.option("--depth", type=POSITIVE, default=None)
@click.option("--top-k", type=POSITIVE, default=None)
@click.option("--backend", type=click.Choice(["ort", "ort-cuda", "tensorrt"]), default="ort",
              show_default=True)
@click.option("--threads", type=POSITIVE, default=None, help="CPU threads per graph.")
def serve(artifacts, drafter, host, port, workers, queue, api_key, allow_local_images,
          model_name, shutdown_timeout, total_tokens, depth, top_k, backend, threads):
    """Serve ARTIFACTS over an OpenAI-compatible HTTP API (POST /v1/chat/completions,
    streamed or not, images as data: URIs; GET /v1/models, GET /health) until SIGTERM."""
    _extra("fastapi", "serve")
    _extra("uvicorn", "serve")
    tree = _tree_setting(total_tokens, depth, top_k)
    pipes = []
    for _ in range(workers):
        pipes.append(_pipeline(artifacts, drafter, backend, threads, tree=tree,  # workers
                               keep_spinning=None if workers == 1 else False))  # share cores
        pipes[-1].tree_policy()  # `auto` measures once, before any request
    from vispec.runtime.serve.app import Settings
    from vispec.runtime.serve.server import serve as run
    settings = Settings(model_name or Path(artifacts).resolve().name, queue, api_key,
                        allow_local_images)
    click.echo(f"serving {settings.model!r} on http://{host}:{port}/v1 with {workers} "
               f"worker(s){', speculative' if drafter else ''}", err=True)
    run(pipes, settings, host, port, shutdown_timeout)


@click.command("triton-repo")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--drafter", type=click.Path(path_type=Path), default=None,
              help="Drafter artifact folder: speculative decoding in the model.")
@click.option("--instances", type=POSITIVE, default=1, show_default=True,
              help="Model instances (each one Pipeline with its own KV caches).")
@click.option("--model-name", default="vispec", show_default=True)
@click.option("--overwrite", is_flag=True,
              help="Replace OUT_DIR if it is an earlier output of vispec-export.")
def triton_repo(artifacts, out_dir, drafter, instances, model_name, overwrite):
    """Write a Triton Inference Server model repository for ARTIFACTS (Python backend,
    decoupled streaming model) that `tritonserver --model-repository OUT_DIR` loads."""
    from vispec.runtime.serve.triton import write_repository
    path = write_repository(artifacts, out_dir, drafter=drafter, instances=instances,
                            model_name=model_name, overwrite=overwrite)
    click.echo(f"wrote {path}", err=True)
