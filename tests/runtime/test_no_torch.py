"""The runtime imports and generates with torch unavailable (a Jetson image has none)."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from vispec.runtime.pipeline import Pipeline
    import vispec.runtime.backends.ort, vispec.runtime.speculative, vispec.runtime.drafters
    result = Pipeline(sys.argv[1]).generate("What is this?", max_new_tokens=4)
    assert len(result.tokens) >= 1
    assert sys.modules["torch"] is None
    print("ok", result.tokens)
""")


def test_runtime_generates_without_torch(tiny_target):
    _, artifacts = tiny_target("qwen2_5_vl")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(artifacts)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
