"""The float head's greedy screen on a target (``export --attention gqa``, float32): how many
candidates it leaves on real decode states, whether its token is the float head's, and what
a step costs with the screen against the float head, by rows (1 = a decode step, more = a
tree), interleaved in one process.

    python benchmarks/head_screen.py TARGET_DIR [--threads 2] [--steps 40] [--repeats 5]
        [--rows 1,4,8,16,32]

Both step forms run the same LM graph: ``greedy=True`` skips its head and runs the screen
(up to ``head_screen.MAX_ROWS`` rows; wider steps keep the float head whatever is asked, so
their rows compare the head with itself), ``greedy=False`` runs the float head on every row.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from vispec.runtime.generate import prefill
from vispec.runtime.masks import causal_mask
from vispec.runtime.specs import SCREEN_CANDIDATES
from vispec.runtime.target import TargetModel

PROMPTS = ("Explain how a bicycle works.", "Write a short story about a robot learning to paint.",
           "Why is the sky blue?", "Give me three tips for a job interview.", "What is a volcano?")


def screened_states(target: TargetModel, steps: int) -> tuple[int, int, list[int]]:
    """Greedy decoding of ``PROMPTS`` with the float head: (states, screened token equal to
    the float head's argmax, candidates per state)."""
    same, candidates = 0, []
    for text in PROMPTS:
        prompt = target.prepare(text)
        cache = target.new_cache()
        state = prefill(target, cache, prompt)
        token, position = int(state.out.logits_row(-1).argmax()), state.next_position
        for _ in range(steps):
            out = target.step_tokens(cache, [token], target.glue.step_position_ids(
                position, np.zeros(1, np.int64)), causal_mask(cache.length, 1))
            cache.commit(1)
            position += 1
            hidden, token = out.hidden, int(out.logits[0].argmax())
            candidates.append(int(target.screen.run(hidden)[SCREEN_CANDIDATES].sum()))
            same += int(target.screen.argmax(hidden)[0]) == token
            if token in target.eos_token_ids:
                break
    return len(candidates), same, candidates


def step_seconds(target: TargetModel, rows: int, greedy: bool, repeats: int) -> float:
    """Median seconds of a step over ``rows`` new tokens after a 64-row context, with the
    greedy choice made (``argmax``)."""
    cache = target.new_cache()
    context = 64
    target.step(cache, target.embed(np.arange(context) + 100), np.arange(context)[None],
                causal_mask(0, context))
    cache.commit(context)
    ids = np.arange(rows) + 200
    positions = np.arange(context, context + rows)[None]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        target.step_tokens(cache, ids, positions, causal_mask(context, rows), greedy=greedy).argmax()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a float32 gqa target folder (with screen.onnx)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default="1,4,8,16,32")
    args = parser.parse_args()
    target = TargetModel(args.target, threads=args.threads)
    if target.screen is None:
        raise SystemExit(f"{args.target} has no head screen (export a float32 target with "
                         f"--attention gqa)")
    states, same, candidates = screened_states(target, args.steps)
    c = np.array(candidates)
    print(f"{states} decode states: screened token == float head's in {same}; candidates "
          f"median {np.median(c):.0f}, 90% {np.percentile(c, 90):.0f}, max {c.max()} of "
          f"{target.facts['vocab_size']}")
    print("| rows | step, float head (ms) | step, screen (ms) | float / screen |")
    print("|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        pairs = []
        for i in range(3):  # alternate the order, then take medians
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {greedy: step_seconds(target, rows, greedy, args.repeats) for greedy in order}
            pairs.append((got[False], got[True]))
        full = statistics.median(p[0] for p in pairs) * 1e3
        screen = statistics.median(p[1] for p in pairs) * 1e3
        print(f"| {rows} | {full:.2f} | {screen:.2f} | {full / screen:.2f}x |")


if __name__ == "__main__":
    main()
