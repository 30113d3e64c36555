"""The runtime drafter package imports and runs with torch unavailable."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    from vispec.runtime.drafters import open_drafter
    from vispec.runtime.masks import causal_mask
    from vispec.runtime.target import TargetModel
    target = TargetModel(sys.argv[1])
    session = open_drafter(sys.argv[2], target)
    prompt = target.prepare("What is this?")
    embeds = target.prompt_embeds(prompt)
    positions, _ = target.glue.position_ids(prompt)
    out = target.step(target.new_cache(), embeds, positions, causal_mask(0, len(embeds)))
    logp, ids = session.prefill(prompt.input_ids, embeds, out.hidden, int(out.logits[-1].argmax()))
    assert ids.shape == (session.top_k,) and sys.modules["torch"] is None
    print("ok")
""")


def test_drafter_runtime_without_torch(tiny_target, tiny_drafter):
    _, target_artifacts = tiny_target("qwen2_5_vl")
    _, drafter_artifacts = tiny_drafter("vispec", "qwen2_5_vl")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(target_artifacts),
                           str(drafter_artifacts)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
