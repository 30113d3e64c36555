"""The runtime imports and generates with torch unavailable (a Jetson image has none), and
what it needs for that is installed by the runtime's own requirements (no extras)."""
import importlib.metadata as md
import json
import re
import subprocess
import sys
import textwrap

from packaging.requirements import Requirement

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from vispec.runtime.pipeline import Pipeline
    import vispec.runtime.backends.ort, vispec.runtime.speculative, vispec.runtime.drafters, vispec.runtime.cli
    result = Pipeline(sys.argv[1]).generate("What is this?", max_new_tokens=4)
    assert len(result.tokens) >= 1
    assert sys.modules["torch"] is None
    print(json.dumps({"tokens": result.tokens,
                      "modules": sorted({m.split(".")[0] for m, v in sys.modules.items() if v})}))
""")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_closure(root: str = "vispec-export") -> set[str]:
    """Distributions installed by ``pip install vispec-export`` (no extras), transitively."""
    seen, todo = set(), [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        if _canonical(name) in seen:
            continue
        seen.add(_canonical(name))
        for line in md.requires(name) or []:
            req = Requirement(line)
            env = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in env):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_runtime_generates_without_torch(tiny_target):
    _, artifacts = tiny_target("qwen2_5_vl")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(artifacts)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) >= 1

    # Packages the runtime cannot generate without (jinja2 renders the chat template: a
    # runtime-only install once lacked it). Other imports seen here can be opportunistic
    # (anyio probing trio), so only these are checked against the requirements.
    modules = ("jinja2", "numpy", "onnxruntime", "tokenizers", "PIL")
    assert set(modules) <= set(out["modules"])
    owners = md.packages_distributions()
    needed = {_canonical(d) for m in modules for d in owners[m]}
    missing = needed - _runtime_closure()
    assert not missing, f"imported at run time but not required by the runtime: {missing}"
