"""This project beside ONNX Runtime GenAI (the tool a user would pick instead) on the demo's
SmolLM2-135M-Instruct: same HF folder, same prompt ids, same thread count, one warm process.

ORT-GenAI's own builder makes the peer model from the HF folder the demo converts the GGUF
into (``exporter/demo/real_lm.py``); the project exports the demo's LLaVA target around the same
language model. Per precision (fp32, int4) every text prompt is decoded greedily by the peer,
by the project plainly and by the project speculatively (the demo's drafter, ``auto`` tree),
in an order that rotates between repeats, after a warm-up pass; image prompts (held-out
synthetic images) run on the project only (the peer cannot load the LLaVA). Decode tok/s
(tokens after the first over the time after it) and TTFT (prompt in, first token out) are
medians over runs, and their ratios medians over pairs of runs of one prompt and repeat (run
back to back); fp32 outputs must be token-identical. Around every timed run /proc/stat
and /proc/*/stat are sampled: a group where other processes used more than ``--quiet``
cores on average is marked contended (ratios flip under load: see shared/PITFALLS.md).

    pip install -e '.[peers]'     # onnxruntime-genai; this script installs nothing
    python benchmarks/peers.py [--precisions fp32,int4] [--threads 2] [--repeats 3]
        [--max-new-tokens 128] [--images 4] [--drafter vispec|none] [--png peers.png]
        [--attention gqa|standard] [--weights-method rtn|gptq|minmax] [--calibration FILE]
        [--weights-head int8|int4] [--weights-block 32|64|128] [--peer-block 32|64|128]
        [--json FILE] [--workdir DIR]

Plain rows run a drafter-less ``Pipeline`` (as a user decoding plainly loads it: its LM's
thread pool spins on between steps), speculative rows one with the drafter.
``--weights-block`` / ``--peer-block``: the int4 block of each side (both default to 32, the
peer builder's; the project's fastest accurate form is ``--weights-method gptq
--weights-block 64``, RESULTS.md). ``--weights-method gptq`` calibrates on
``--calibration`` (default: 32 of the demo's training images with both questions and GPTQ's
text prompts, ``real_target.write_calibration``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vispec.runtime.cpu_load import (  # noqa: F401  (the sampler, used here and tested)
    QUIET_CORES,
    Contention,
    CpuSample,
    contention,
    parse_proc_stat,
    parse_stat,
    sample_cpu,
)

PROJECT, PEER = "project", "ort-genai"
PLAIN, SPECULATIVE = "plain", "speculative"
# keys of a Group's medians: side and mode
PLAIN_KEY, SPEC_KEY, PEER_KEY = f"{PROJECT} {PLAIN}", f"{PROJECT} {SPECULATIVE}", f"{PEER} {PLAIN}"
TEXT_PROMPTS = ("Tell me about a lighthouse.", "What is a volcano?",
                "Write a short poem about the sea at night.",
                "Explain step by step how a bicycle gear system works.")


# -- one timed generation ----------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    side: str
    mode: str
    precision: str
    group: str          # "text" or "image"
    prompt: int
    tokens: tuple[int, ...]
    ttft: float         # seconds from the prompt ids to the first token
    decode_seconds: float
    cpu: Contention
    repeat: int = 0     # runs of one (prompt, repeat) ran back to back: ratios pair them

    @property
    def tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds else 0.0


SETTLE_SECONDS = 0.2  # idle before each timed run: the last run's thread pool stops spinning


def timed(fn, own_pid: int = os.getpid()):
    """``fn()`` -> (tokens, ttft, decode seconds), with the CPU use of everything else.

    Runs after ``SETTLE_SECONDS`` of idle: ORT-GenAI's pool workers spin on after its run
    (the project's stop when a run ends), and a next run timed while they spin loses its
    cores to them (measured: the project's TTFT doubled right after a peer run)."""
    time.sleep(SETTLE_SECONDS)
    before, t0 = sample_cpu(), time.perf_counter()
    tokens, ttft, decode = fn()
    seconds, after = time.perf_counter() - t0, sample_cpu()
    return tokens, ttft, decode, contention(before, after, own_pid, seconds)


class PeerModel:
    """An ORT-GenAI model folder with a fixed intra-op thread count, run greedily on ids."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og
        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def generate(self, ids: list[int], max_new_tokens: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, t1 - t0, time.perf_counter() - t1


DEFAULT_BLOCK = 32  # the default quantization block of both: the project's export, the peer's builder


def block_suffix(block: int) -> str:
    """A work folder's suffix for a quantization block other than 32."""
    return "" if block == DEFAULT_BLOCK else f"-b{block}"


def build_peer(hf_dir: Path, out: Path, precision: str, block: int = DEFAULT_BLOCK) -> Path:
    """ORT-GenAI's builder on ``hf_dir`` (CPU), once per precision (int4: blocks of
    ``block``)."""
    if not (out / "genai_config.json").exists():
        extra = ["--extra_options", f"block_size={block}"] if block != DEFAULT_BLOCK else []
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                        "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "peer-cache"),
                        *extra], check=True)
    return out


# -- the project side ------------------------------------------------------------------------
def project_run(pipe, prompt, max_new_tokens: int, speculative: bool):
    from vispec.runtime.generate import generate_plain
    from vispec.runtime.speculative import generate_speculative

    if speculative:  # one-generation sessions: no prompt rows reused between runs
        result = generate_speculative(pipe.target, pipe.drafter, prompt, max_new_tokens,
                                      tree=pipe.tree_policy(), cache=pipe.cache)
    else:
        result = generate_plain(pipe.target, prompt, max_new_tokens, pipe.cache)
    return result.tokens, result.stats.prefill_seconds, result.stats.decode_seconds


# -- summary ----------------------------------------------------------------------------------
@dataclass
class Group:
    """Medians of one (prompt group, precision) over its runs, per side and mode."""

    group: str
    precision: str
    tok_s: dict[str, float] = field(default_factory=dict)   # "project plain" -> median tok/s
    ttft: dict[str, float] = field(default_factory=dict)    # -> median seconds
    others: float = 0.0                                      # others' mean cores (time-weighted)
    busiest: tuple = ()
    identical: bool | None = None                            # fp32: project == peer tokens
    points: dict[str, dict] = field(default_factory=dict)    # key -> {(prompt, repeat): Run}

    def contended(self, quiet: float = QUIET_CORES) -> bool:
        return self.others > quiet

    def ratio(self, a: str, b: str, of: str = "tok_s") -> float | None:
        """``a`` over ``b``: the median of the ratios of runs of the same prompt and repeat
        (back to back, under the same load: a drift of the machine cancels out), else the
        ratio of the medians."""
        value = (lambda r: r.tokens_per_second) if of == "tok_s" else (lambda r: r.ttft)
        pa, pb = self.points.get(a, {}), self.points.get(b, {})
        paired = [value(pa[k]) / value(pb[k]) for k in pa.keys() & pb.keys() if value(pb[k])]
        if paired:
            return statistics.median(paired)
        values = getattr(self, of)
        return values[a] / values[b] if a in values and b in values and values[b] else None

    def to_dict(self) -> dict:
        """The medians, contention and identity, with the table's paired ratios."""
        out = {k: v for k, v in self.__dict__.items() if k != "points"}
        out["ratios"] = {"plain / peer": self.ratio(PLAIN_KEY, PEER_KEY),
                         "TTFT plain / peer": self.ratio(PLAIN_KEY, PEER_KEY, "ttft"),
                         "spec / peer": self.ratio(SPEC_KEY, PEER_KEY),
                         "spec / plain": self.ratio(SPEC_KEY, PLAIN_KEY)}
        return out


def summarize(runs: list[Run]) -> list[Group]:
    """Median tok/s and TTFT per (group, precision, side + mode); contention and fp32 identity."""
    groups: dict[tuple[str, str], Group] = {}
    for run in runs:
        groups.setdefault((run.group, run.precision), Group(run.group, run.precision))
    for (name, precision), g in groups.items():
        mine = [r for r in runs if (r.group, r.precision) == (name, precision)]
        # others' cores over the group's time: a run's own share is in 10 ms jiffies, +-0.25
        # cores of a 40 ms image answer, so the busiest run of many says nothing
        spans = [r.ttft + r.decode_seconds for r in mine]
        used = [r.cpu.cores * span for r, span in zip(mine, spans)]
        g.others = sum(used) / max(sum(spans), 1e-9)
        g.busiest = mine[max(range(len(mine)), key=used.__getitem__)].cpu.by_process
        for key in sorted({f"{r.side} {r.mode}" for r in mine}):
            same = [r for r in mine if f"{r.side} {r.mode}" == key]
            g.tok_s[key] = statistics.median(r.tokens_per_second for r in same)
            g.ttft[key] = statistics.median(r.ttft for r in same)
            g.points[key] = {(r.prompt, r.repeat): r for r in same}
        if precision == "fp32" and any(r.side == PEER for r in mine):
            outputs = {(r.side, r.prompt): r.tokens for r in mine if r.mode == PLAIN}
            g.identical = all(outputs[PROJECT, p] == t for (side, p), t in outputs.items()
                              if side == PEER)
    return list(groups.values())


def format_groups(groups: list[Group], quiet: float = QUIET_CORES) -> str:
    plain, spec, peer = PLAIN_KEY, SPEC_KEY, PEER_KEY
    lines = ["| prompts | precision | project plain tok/s | peer tok/s | plain / peer | TTFT ms "
             "project / peer | TTFT ratio | speculative tok/s | spec / peer | spec / plain | "
             "fp32 identical | others' CPU (cores) |", "|" + "---|" * 12]
    cell = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for g in groups:
        ttft = "-" if peer not in g.ttft else f"{g.ttft[plain] * 1e3:.0f} / {g.ttft[peer] * 1e3:.0f}"
        busy = ", ".join(f"{n} {c:.2f}" for n, c in g.busiest[:2])
        lines.append(
            f"| {g.group} | {g.precision} | {cell(g.tok_s.get(plain), '{:.1f}')} | "
            f"{cell(g.tok_s.get(peer), '{:.1f}')} | {cell(g.ratio(plain, peer))} | {ttft} | "
            f"{cell(g.ratio(plain, peer, 'ttft'))} | {cell(g.tok_s.get(spec), '{:.1f}')} | "
            f"{cell(g.ratio(spec, peer))} | {cell(g.ratio(spec, plain))} | "
            f"{'-' if g.identical is None else g.identical} | {g.others:.2f}"
            f"{' CONTENDED: ' + busy if g.contended(quiet) else ''} |")
    return "\n".join(lines)


def plot(groups: list[Group], path: Path, quiet: float = QUIET_CORES) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in (PLAIN_KEY, SPEC_KEY, PEER_KEY)
            if any(k in g.tok_s for g in groups)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([j + i * width for j in range(len(groups))], [g.tok_s.get(key, 0) for g in groups],
               width, label=key)
    ax.set_xticks([j + width for j in range(len(groups))],
                  [f"{g.group} {g.precision}{' (contended)' if g.contended(quiet) else ''}" for g in groups])
    ax.set_ylabel("decode tokens/s (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- main --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="gqa", help="the project's LM graph form: "
                        "gqa (ONNX Runtime's fused CPU kernels) or standard")
    parser.add_argument("--weights-method", default="rtn", help="the project's int4/int8 "
                        "rounding: rtn (as the peer's builder), gptq or minmax")
    parser.add_argument("--weights-head", default=None, choices=("int8", "int4"),
                        help="the project's LM head precision at int4 (default: the "
                             "method's; the peer's builder makes it int4)")
    parser.add_argument("--weights-block", type=int, default=DEFAULT_BLOCK, choices=(32, 64, 128),
                        help="the project's int4/int8 block (64: int4 steps ~10-15%% faster than 32)")
    parser.add_argument("--peer-block", type=int, default=DEFAULT_BLOCK, choices=(32, 64, 128),
                        help="the peer's int4 block (default: its builder's)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="gptq's calibration file (default: the demo's training images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--images", type=int, default=4, help="held-out image prompts (project)")
    parser.add_argument("--drafter", default="vispec", help="vispec|hivis|eagle, or none")
    parser.add_argument("--quiet", type=float, default=QUIET_CORES,
                        help="others' mean CPU use (cores) above which a group is contended")
    parser.add_argument("--png", default="peers.png", help="the chart ('' for none)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from vispec.exporter.demo.real_demo import MAX_LEN, export_demo_drafter
    from vispec.exporter.demo.real_drafters import demo_drafters
    from vispec.exporter.demo.real_lm import smollm2_dir
    from vispec.exporter.demo.real_target import cached_target, write_calibration
    from vispec.exporter.demo.synthetic_images import QUESTION, examples
    from vispec.exporter.export import export_target
    from vispec.runtime.pipeline import Pipeline

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vispec-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    has_peer = importlib.util.find_spec("onnxruntime_genai") is not None
    if not has_peer:
        say("onnxruntime_genai is not installed (pip install -e '.[peers]'): project side only")
    precisions = args.precisions.split(",")
    model_dir, hf_dir = cached_target(say), smollm2_dir(progress=say)
    method = {p: "rtn" if p == "fp32" else args.weights_method for p in {"fp32", *precisions}}
    head = {p: None if p == "fp32" else args.weights_head for p in method}
    block = {p: DEFAULT_BLOCK if p == "fp32" else args.weights_block for p in method}
    targets = {p: work / f"target-{p}-{args.attention}-{method[p]}"
                         f"{'-head-' + head[p] if head[p] else ''}"
                         f"{block_suffix(block[p])}" for p in method}
    for p, out in targets.items():
        if not (out / "manifest.json").exists():
            calibration = None if method[p] != "gptq" else \
                args.calibration or write_calibration(work / "calibration")
            export_target(model_dir, out, max_len=MAX_LEN, weights={"fp32": "float32"}.get(p, p),
                          weights_block=block[p], attention=args.attention, weights_method=method[p],
                          weights_head=head[p], calibration=calibration, progress=say)
    drafter_dir = None
    if args.drafter != "none":  # the demo's drafter (shipped, else trained and cached)
        checkpoint = demo_drafters(model_dir, (args.drafter,), progress=say)[args.drafter]
        drafter_dir = export_demo_drafter(checkpoint, model_dir, work, progress=say)
    # plain rows from a drafter-less pipeline, as a user decoding plainly would load it (its
    # LM's pool spins on between steps: ``TargetModel(keep_spinning=)``)
    plain = {p: Pipeline(targets[p], threads=args.threads) for p in precisions}
    pipes = {p: Pipeline(targets[p], drafter_dir=drafter_dir, threads=args.threads, progress=say)
             for p in precisions} if drafter_dir else {}
    peer_block = {p: DEFAULT_BLOCK if p == "fp32" else args.peer_block for p in precisions}
    peers = {p: PeerModel(build_peer(hf_dir, work / f"peer-{p}{block_suffix(peer_block[p])}", p,
                                     peer_block[p]), args.threads)
             for p in precisions} if has_peer else {}
    texts = [plain[precisions[0]].target.prepare(t) for t in TEXT_PROMPTS]
    images = [plain[precisions[0]].target.prepare(QUESTION, [e.image])
              for e in examples(args.images, 0, "heldout")]
    for pipe in pipes.values():
        pipe.tree_policy()  # auto measures its costs before any timing
    say(f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
        f"{args.threads} threads each; int4 blocks: project {args.weights_block}, peer "
        f"{args.peer_block}; {args.repeats} repeats after a warm-up, "
        f"{args.max_new_tokens} new tokens at most; {len(texts)} text prompts (both), "
        f"{len(images)} held-out images (project)")
    runs: list[Run] = []
    n = args.max_new_tokens
    for repeat in range(args.repeats + 1):
        for p in precisions:
            for group, prompts in (("text", texts), ("image", images)):
                for i, prompt in enumerate(prompts):
                    jobs = [(PROJECT, PLAIN, lambda: project_run(plain[p], prompt, n, False))]
                    if p in pipes:
                        jobs.append((PROJECT, SPECULATIVE,
                                     lambda: project_run(pipes[p], prompt, n, True)))
                    if group == "text" and p in peers:
                        ids = prompt.input_ids.tolist()
                        jobs.append((PEER, PLAIN, lambda: peers[p].generate(ids, n)))
                    for side, mode, job in jobs[repeat % len(jobs):] + jobs[:repeat % len(jobs)]:
                        tokens, ttft, decode, cpu = timed(job)
                        if repeat:
                            runs.append(Run(side, mode, p, group, i, tuple(tokens), ttft, decode, cpu,
                                            repeat))
        say(f"pass {repeat}/{args.repeats}{' (warm-up)' if repeat == 0 else ''} done")
    groups = summarize(runs)
    print(format_groups(groups, args.quiet))
    if any(g.identical is False for g in groups):
        say("WARNING: fp32 outputs of the project and the peer differ")
    if args.png and groups:
        say(f"chart: {plot(groups, Path(args.png), args.quiet)}")
    if args.json:
        args.json.write_text(json.dumps([g.to_dict() for g in groups], indent=1, default=list))


if __name__ == "__main__":
    main()
