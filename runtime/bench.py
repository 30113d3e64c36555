"""Plain vs speculative decoding on the same artifacts, interleaved in one warm process.

Every setting (plain, each fixed tree, ``auto``) decodes every prompt once per repeat, in
an order that rotates between repeats, after one warm-up pass over all of them; tokens/s
is total decoded tokens over total decode time. Greedy outputs are checked against plain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import VispecError
from .generate import GenerationResult
from .pipeline import Pipeline
from .speculative import check_tree_width
from .tree import PLAIN, TreeConfig, tree_name

AUTO = "auto"


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
                "tokens_per_pass": round(self.tokens_per_pass, 4), "identical": self.identical,
                "rounds_per_tree": self.trees_used,
                "ms_per_pass": dict(zip(("draft", "verify", "host"),
                                        (round(ms, 4) for ms in self.pass_split_ms)))}


def run_bench(pipe: Pipeline, prompts: Sequence[tuple[str, list]], trees: Sequence[TreeConfig],
              max_new_tokens: int = 64, repeats: int = 3,
              progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Rows for plain decoding, each tree of ``trees`` and ``auto`` (greedy sampling
    assumed for the identity check; with sampling ``identical`` is not meaningful)."""
    check_tree_width(trees, pipe.drafter)  # before the auto tree's measurements
    settings: list[tuple[str, TreeConfig | str | None]] = [(PLAIN, None)]
    settings += [(tree_name(t), t) for t in trees] + [(AUTO, AUTO)]
    pipe.tree = AUTO
    pipe.tree_policy()  # measure auto's costs before any timing (cached afterwards)
    rows = {name: BenchRow(name, tree if isinstance(tree, TreeConfig) else None)
            for name, tree in settings}
    reference: dict[int, list[int]] = {}
    for repeat in range(repeats + 1):  # repeat 0 warms up
        if progress:
            progress(f"bench pass {repeat}/{repeats}{' (warm-up)' if repeat == 0 else ''}")
        order = settings[repeat % len(settings):] + settings[:repeat % len(settings)]
        for name, tree in order:
            for i, (text, images) in enumerate(prompts):
                result = _generate(pipe, tree, text, images, max_new_tokens)
                if name == PLAIN:
                    reference.setdefault(i, result.tokens)
                if repeat:
                    rows[name].add(result)
                    rows[name].identical &= result.tokens == reference.get(i, result.tokens)
    return list(rows.values())


def _generate(pipe: Pipeline, tree, text: str, images: list, max_new_tokens: int):
    if tree is None:
        return pipe.generate(text, images, max_new_tokens, draft=False)
    pipe.tree = tree
    return pipe.generate(text, images, max_new_tokens)


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table: tokens/s, ratio to plain, tokens per pass, the pass's cost split
    (drafter / target / host ms, host share), identity."""
    plain = next(r for r in rows if r.setting == PLAIN).tokens_per_second
    lines = ["| setting | tok/s | x plain | tokens/pass | ms/pass draft / verify / host | "
             "host share | identical to plain | trees used |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        used = ", ".join(f"{k}: {v}" for k, v in r.trees_used.items()) \
            if r.setting == AUTO else ""
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
