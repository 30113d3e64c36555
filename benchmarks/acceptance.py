"""Drafter acceptance on the demo's SmolLM2 LLaVA target: tokens per target pass on one fixed
tree, so that no timing plays a part (RESULTS.md: acceptance against distilled tokens).

    python benchmarks/acceptance.py [--drafters DIR ...] [--tree 30,5,8] [--images 32]
        [--workdir DIR]

Each drafter checkpoint (default: the demo's shipped ViSpec, HiViS and EAGLE) is exported as
the demo exports it (its ``DRAFT_WEIGHTS``, int4, and 4,096-token draft vocabulary) against the demo's float32
``gqa`` target, then decodes held-out synthetic images asked the short and the detailed
question and the held-out chat prompts (``HELD_OUT_CHAT``) speculatively; each output is
checked against plain greedy decoding. Prints the mean tokens per pass over each group's
prompts.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

IMAGE_TOKENS, TEXT_TOKENS = 48, 96


def prompts(images: int) -> list[tuple[str, str, list, int]]:
    """(group, text, images, new tokens at most) of the held-out prompts."""
    from vispec.exporter.demo.synthetic_images import DETAIL_QUESTION, QUESTION, examples
    from vispec.exporter.drafters.distill import HELD_OUT_CHAT

    held = examples(images, 0, "heldout")
    return ([("images, short", QUESTION, [e.image], IMAGE_TOKENS) for e in held]
            + [("images, detailed", DETAIL_QUESTION, [e.image], IMAGE_TOKENS) for e in held]
            + [("held-out chat", q, [], TEXT_TOKENS) for q in HELD_OUT_CHAT])


def main() -> None:
    from vispec.exporter.demo.real_demo import ATTENTION, MAX_LEN, export_demo_drafter
    from vispec.exporter.demo.real_drafters import KINDS, demo_drafters
    from vispec.exporter.demo.real_target import cached_target
    from vispec.exporter.export import export_target
    from vispec.runtime.generate import generate_plain
    from vispec.runtime.pipeline import Pipeline
    from vispec.runtime.speculative import generate_speculative
    from vispec.runtime.tree import TreeConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafters", type=Path, nargs="+", default=None,
                        help="drafter checkpoints (default: the demo's shipped ones)")
    parser.add_argument("--tree", default="30,5,8", help="total tokens, depth, top-k")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    tree = TreeConfig(*map(int, args.tree.split(",")))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vispec-acceptance-"))
    model_dir = cached_target(print)
    target_dir = work / "target"
    if not (target_dir / "manifest.json").exists():
        export_target(model_dir, target_dir, max_len=MAX_LEN, attention=ATTENTION, progress=print)
    checkpoints = args.drafters or list(demo_drafters(model_dir, KINDS, progress=print).values())
    cases = prompts(args.images)
    plain_pipe = Pipeline(target_dir, threads=1)
    plain = [generate_plain(plain_pipe.target, plain_pipe.target.prepare(text, images), n,
                            plain_pipe.cache).tokens for _, text, images, n in cases]
    groups = list(dict.fromkeys(group for group, *_ in cases))
    print(f"tokens per pass, tree {args.tree}, {args.images} held-out images\n"
          f"| drafter | {' | '.join(groups)} | identical to plain |\n"
          f"|---|{'---|' * len(groups)}---|")
    for checkpoint in checkpoints:
        out = export_demo_drafter(checkpoint, model_dir, work)
        pipe = Pipeline(target_dir, drafter_dir=out, tree=tree, threads=1)
        per_group: dict[str, list[float]] = {g: [] for g in groups}
        identical = True
        for (group, text, images, n), expected in zip(cases, plain):
            result = generate_speculative(pipe.target, pipe.drafter, pipe.target.prepare(text, images),
                                          n, tree=tree, cache=pipe.cache)
            identical &= result.tokens == expected
            per_group[group].append(result.stats.mean_accepted)
        means = " | ".join(f"{np.mean(v):.2f}" for v in per_group.values())
        print(f"| {checkpoint.name} | {means} | {identical} |", flush=True)


if __name__ == "__main__":
    main()
