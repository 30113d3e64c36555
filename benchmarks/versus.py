"""This tree against an earlier commit, on the same artifacts, in one run: plain and
speculative decode tok/s of each, their ratio.

The earlier commit is checked out with ``git worktree`` into a temporary folder; each side
runs in a fresh child process that imports ``vispec`` from its own tree (the editable
install's finder is dropped in the child), loads the same target and drafter artifacts and
decodes the same prompts: text and held-out synthetic images, greedily, after a warm-up.
The sides alternate over ``--repeats`` rounds (order flipped every round); medians of the
rounds are compared, and the token ids must match between the sides.

    python benchmarks/versus.py --base REV --target DIR --drafter DIR [--tree 8,2,3]
        [--repeats 3] [--max-new-tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "exporter", "engines")
TEXTS = ("Tell me about a lighthouse.", "Explain how a bicycle works.")

CHILD = r'''
import json, sys, time
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]
sys.path.insert(0, sys.argv[1])
args = json.loads(sys.argv[2])
try:
    from vispec.exporter.demo.synthetic_images import QUESTION, examples
except ImportError:  # a commit from before the demo sub-package
    from vispec.exporter.synthetic_images import QUESTION, examples
from vispec.runtime.drafters import open_drafter
from vispec.runtime.generate import generate_plain
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.target import TargetModel
from vispec.runtime.tree import TreeConfig
target = TargetModel(args["target"], threads=args["threads"])
drafter = open_drafter(args["drafter"], target)
tree = TreeConfig(*args["tree"])
prompts = [target.prepare(t) for t in args["texts"]]
prompts += [target.prepare(QUESTION, [e.image]) for e in examples(args["images"], 0, "heldout")]
n = args["max_new_tokens"]
def rate(result):
    return (len(result.tokens) - 1) / max(result.stats.decode_seconds, 1e-9)
out = {"plain": [], "speculative": [], "tokens": []}
for warm in (True, False):
    for p in prompts:
        a = generate_plain(target, p, n)
        b = generate_speculative(target, drafter, p, n, tree=tree)
        if not warm:
            out["plain"].append(rate(a)); out["speculative"].append(rate(b))
            out["tokens"].append([a.tokens, b.tokens])
print("RESULT " + json.dumps(out))
'''


def shim(tree: Path, folder: Path) -> Path:
    """A folder holding ``vispec/<package>`` links into ``tree`` (the package-dir mapping of
    pyproject.toml), to put first on a child's path."""
    (folder / "vispec").mkdir(parents=True)
    for name in PACKAGES:
        (folder / "vispec" / name).symlink_to(tree / name)
    return folder


def run_side(path: Path, args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(args)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"child failed ({path}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--drafter", type=Path, required=True)
    parser.add_argument("--tree", default="8,2,3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    child = {"target": str(a.target.resolve()), "drafter": str(a.drafter.resolve()),
             "tree": [int(x) for x in a.tree.split(",")], "texts": list(TEXTS),
             "images": a.images, "max_new_tokens": a.max_new_tokens, "threads": a.threads}
    with tempfile.TemporaryDirectory(prefix="vispec-versus-") as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree),
                        a.base], check=True, capture_output=True)
        try:
            sides = {"base": shim(base_tree, tmp / "shim-base"),
                     "head": shim(ROOT, tmp / "shim-head")}
            runs = {name: [] for name in sides}
            for repeat in range(a.repeats):
                order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
                for name in order:
                    runs[name].append(run_side(sides[name], child))
                    print(f"round {repeat + 1}/{a.repeats}: {name} done", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(base_tree)], capture_output=True)
    same = all(r["tokens"] == runs["base"][0]["tokens"] for side in runs.values() for r in side)
    print(f"head = this tree, base = {a.base}; tree {a.tree}, {a.threads} threads, "
          f"{a.max_new_tokens} new tokens, {len(TEXTS)} text + {a.images} image prompts, "
          f"{a.repeats} rounds (medians of per-round means)")
    print("| mode | base tok/s | head tok/s | head / base |")
    print("|---|---|---|---|")
    for mode in ("plain", "speculative"):
        base, head = (statistics.median(statistics.mean(r[mode]) for r in runs[s])
                      for s in ("base", "head"))
        print(f"| {mode} | {base:.1f} | {head:.1f} | {head / base:.2f} |")
    print(f"same tokens on both sides: {same}")


if __name__ == "__main__":
    main()
