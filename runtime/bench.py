"""Plain vs speculative decoding on the same artifacts, interleaved in one warm process.

Every setting (plain, each fixed tree, ``auto``) decodes every prompt once per repeat, the
settings one after another on each prompt, in an order that rotates from prompt to prompt
and between repeats (a drift of the machine's speed, 10-30% within seconds on a shared
one, then hits every setting alike), after one warm-up pass over all of them; tokens/s
is total decoded tokens over total decode time, and per repeat for medians. Greedy outputs
are checked against plain. Around each repeat ``/proc/stat`` is sampled: a repeat where
other processes used more than ``QUIET_CORES`` counts as contended, and medians take the
quiet repeats only (all of them when none was quiet). ``interleaved`` runs any settings
(e.g. one pipeline per drafter, as the demo does); ``run_bench`` the trees of one pipeline.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from .cpu_load import QUIET_CORES, contention, sample_cpu
from .errors import VispecError
from .generate import GenerationResult
from .pipeline import Pipeline
from .speculative import check_tree_width
from .tree import PLAIN, TreeConfig, tree_name
from .tree_policy import AUTO, AutoTree, TreePolicy

Generate = Callable[[str, list], GenerationResult]  # (text, images) -> one generation


@dataclass
class BenchRow:
    """One setting's totals over all prompts and repeats."""

    setting: str                  # "plain", "auto" or "total,depth,top_k"
    tree: TreeConfig | None
    decoded: int = 0              # tokens after the first of each generation
    seconds: float = 0.0          # decode time (prefill excluded)
    passes: int = 0               # target passes after the prefill
    identical: bool = True        # greedy output == plain's, every time
    trees_used: dict[str, int] = field(default_factory=dict)  # rounds per tree (auto)
    split_ms: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # draft, verify, host
    repeats: list[tuple[int, float]] = field(default_factory=list)  # (decoded, seconds) each
    others: list[float] = field(default_factory=list)  # other processes' cores, per repeat

    @property
    def tokens_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.decoded / self.passes if self.passes else 0.0

    @property
    def pass_split_ms(self) -> tuple[float, ...]:
        """Mean milliseconds per pass in drafter calls, the target pass and host work."""
        return tuple(ms / self.passes if self.passes else 0.0 for ms in self.split_ms)

    def quiet(self, quiet: float = QUIET_CORES) -> list[int]:
        """The repeats in which other processes stayed below ``quiet`` cores; all of them
        when none did (``contended`` then tells)."""
        calm = [i for i, cores in enumerate(self.others) if cores <= quiet]
        return calm or list(range(len(self.repeats)))

    def contended(self, quiet: float = QUIET_CORES) -> bool:
        """True when every repeat was contended (the medians are then unreliable)."""
        return bool(self.others) and min(self.others) > quiet

    def median_tokens_per_second(self, quiet: float = QUIET_CORES) -> float:
        """The median over the quiet repeats of each repeat's tokens/s."""
        rates = [d / s if s else 0.0 for d, s in (self.repeats[i] for i in self.quiet(quiet))]
        return statistics.median(rates) if rates else self.tokens_per_second

    def speedup(self, base: "BenchRow", quiet: float = QUIET_CORES) -> float:
        """The median over the quiet repeats of this row's tokens/s over ``base``'s in the
        same repeat (settings of one repeat ran interleaved, under the same load)."""
        ratios = [(d / s) / (bd / bs) for i in self.quiet(quiet)
                  for (d, s), (bd, bs) in [(self.repeats[i], base.repeats[i])] if s and bs and bd]
        if ratios:
            return statistics.median(ratios)
        return self.tokens_per_second / base.tokens_per_second if base.tokens_per_second else 0.0

    def add(self, result: GenerationResult) -> None:
        s = result.stats
        self.decoded += sum(s.accepted)
        self.seconds += s.decode_seconds
        self.passes += len(s.rounds)
        for name, count in s.rounds_per_tree().items():
            self.trees_used[name] = self.trees_used.get(name, 0) + count
        for r in s.rounds:
            for i, ms in enumerate((r.draft_ms, r.verify_ms, r.host_ms)):
                self.split_ms[i] += ms

    def to_dict(self) -> dict:
        return {"setting": self.setting, "tokens_per_second": round(self.tokens_per_second, 3),
                "median_tokens_per_second": round(self.median_tokens_per_second(), 3),
                "tokens_per_pass": round(self.tokens_per_pass, 4), "identical": self.identical,
                "others_cores_per_repeat": self.others, "contended": self.contended(),
                "rounds_per_tree": self.trees_used,
                "ms_per_pass": dict(zip(("draft", "verify", "host"),
                                        (round(ms, 4) for ms in self.pass_split_ms)))}


def run_bench(pipe: Pipeline, prompts: Sequence[tuple[str, list]], trees: Sequence[TreeConfig],
              max_new_tokens: int = 64, repeats: int = 3,
              progress: Callable[[str], None] | None = None,
              margins: Sequence[float] = (), lookups: Sequence[int] = ()) -> list[BenchRow]:
    """Rows for plain decoding, each tree of ``trees`` and ``auto``, the policy of ``pipe``
    (built with ``tree="auto"``, the default), then ``auto`` on the same costs with each
    of ``margins`` (rows "auto m=<margin>") and with each lookup length of ``lookups``
    instead of the pipeline's (rows "auto lookup=<n>"), each policy learning on its own. Greedy
    sampling is assumed for the identity check; with sampling ``identical`` is not
    meaningful."""
    if pipe.tree != AUTO:
        raise VispecError(f"run_bench compares fixed trees with 'auto', but the pipeline's tree "
                          f"is {pipe.tree!r}. Hint: build the Pipeline with tree='auto'")
    check_tree_width(trees, pipe.drafter)  # before the auto tree's measurements
    auto = pipe.tree_policy()  # measure auto's costs before any timing (cached afterwards)
    settings: list[tuple[BenchRow, TreePolicy | None]] = [(BenchRow(PLAIN, None), None)]
    settings += [(BenchRow(tree_name(t), t), t) for t in trees] + [(BenchRow(AUTO, None), auto)]
    if (margins or lookups) and not isinstance(auto, AutoTree):
        raise VispecError("auto decodes plainly here (no candidate tree fits the cache), so "
                          "it has no margin or lookup to compare. Hint: leave them out")
    settings += [(BenchRow(f"{AUTO} m={m:g}", None), AutoTree(auto.round_ms, auto.plain_ms,
                                                              margin=m)) for m in margins]
    runs = [(row, partial(_generate, pipe, tree, max_new_tokens)) for row, tree in settings]
    runs += [(BenchRow(f"{AUTO} lookup={n}", None),
              partial(_generate, pipe, AutoTree(auto.round_ms, auto.plain_ms), max_new_tokens,
                      lookup=n)) for n in lookups]
    return interleaved(runs, prompts, repeats, progress)


def interleaved(settings: Sequence[tuple[BenchRow, Generate]], prompts: Sequence[tuple[str, list]],
                repeats: int = 3, progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Each setting generates for every prompt once per repeat, all settings on one prompt
    before the next, their order rotating from prompt to prompt and between repeats, after a
    warm-up pass (repeat 0, not counted); the first setting's warm-up outputs are the
    reference of ``identical``. Fills and returns the rows."""
    reference: dict[int, list[int]] = {}
    first = settings[0][0]
    for repeat in range(repeats + 1):  # repeat 0 warms up
        if progress:
            progress(f"bench pass {repeat}/{repeats}{' (warm-up)' if repeat == 0 else ''}")
        totals = {id(row): (row.decoded, row.seconds) for row, _ in settings}
        before, start = sample_cpu(), time.perf_counter()
        for i, (text, images) in enumerate(prompts):
            shift = (repeat + i) % len(settings)
            for row, generate in settings[shift:] + settings[:shift]:
                result = generate(text, images)
                if row is first:
                    reference.setdefault(i, result.tokens)
                if repeat:
                    row.add(result)
                    row.identical &= result.tokens == reference.get(i, result.tokens)
        if repeat:
            others = contention(before, sample_cpu(), os.getpid(),
                                time.perf_counter() - start).cores
            for row, _ in settings:
                decoded, seconds = totals[id(row)]
                row.repeats.append((row.decoded - decoded, row.seconds - seconds))
                row.others.append(others)
    return [row for row, _ in settings]


def _generate(pipe: Pipeline, tree: TreePolicy | None, max_new_tokens: int, text: str,
              images: list, lookup: int | None = None) -> GenerationResult:
    """One generation: plain where ``tree`` is None, else speculative with that policy (and
    ``lookup`` for this call instead of the pipeline's, if given)."""
    if tree is None:
        return pipe.generate(text, images, max_new_tokens, draft=False)
    session, kept = pipe.session, pipe.session.lookup
    session.lookup = kept if lookup is None else lookup
    try:
        return pipe.generate(text, images, max_new_tokens, tree=tree)
    finally:
        session.lookup = kept


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table: tokens/s, ratio to plain, tokens per pass, the pass's cost split
    (drafter / target / host ms, host share), identity."""
    plain = next(r for r in rows if r.setting == PLAIN).tokens_per_second
    lines = ["| setting | tok/s | x plain | tokens/pass | ms/pass draft / verify / host | "
             "host share | identical to plain | trees used |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        used = ", ".join(f"{k}: {v}" for k, v in r.trees_used.items()) \
            if r.setting.startswith(AUTO) else ""
        split = r.pass_split_ms
        share = split[2] / sum(split) if sum(split) else 0.0
        lines.append(f"| {r.setting} | {r.tokens_per_second:.1f} | "
                     f"{r.tokens_per_second / plain:.2f} | {r.tokens_per_pass:.2f} | "
                     f"{split[0]:.2f} / {split[1]:.2f} / {split[2]:.3f} | {share:.1%} | "
                     f"{r.identical} | {used} |")
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: str | Path, title: str = "") -> Path:
    """PNG: tokens/s and tokens per pass against tree size; plain and auto as lines."""
    try:
        import matplotlib
    except ImportError:
        raise VispecError("writing a chart needs matplotlib. Hint: pip install "
                          "'vispec-export[bench]' (or leave out --png)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = [r for r in rows if r.tree is not None]
    plain = next(r for r in rows if r.setting == PLAIN)
    auto = next(r for r in rows if r.setting == AUTO)
    sizes = [r.tree.total_tokens for r in trees]
    fig, (speed, per_pass) = plt.subplots(1, 2, figsize=(10, 4))
    speed.plot(sizes, [r.tokens_per_second for r in trees], "o-", label="fixed tree")
    speed.axhline(plain.tokens_per_second, color="grey", ls="--", label="plain")
    speed.axhline(auto.tokens_per_second, color="tab:green", ls="-",
                  label=f"auto ({_main_choice(auto)})")
    speed.set(xlabel="tree size (tokens verified per pass)", ylabel="decode tokens/s")
    per_pass.plot(sizes, [r.tokens_per_pass for r in trees], "o-")
    per_pass.axhline(auto.tokens_per_pass, color="tab:green")
    per_pass.set(xlabel="tree size (tokens verified per pass)", ylabel="tokens per target pass")
    speed.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _main_choice(row: BenchRow) -> str:
    return max(row.trees_used, key=row.trees_used.get) if row.trees_used else PLAIN
