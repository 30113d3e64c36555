"""vispec.runtime: run exported VLM targets and drafters with no torch installed.

    from vispec.runtime import Pipeline, Sampling, TreeConfig
    pipe = Pipeline("artifacts/target", drafter_dir="artifacts/drafter")
    print(pipe.generate("What is in the picture?", images=["cat.jpg"]).text)

Names are imported on first use, so ``import vispec.runtime.<module>`` stays light.
"""
import importlib

_EXPORTS = {
    "GenerationResult": "generate", "GenerationStats": "generate", "generate_plain": "generate",
    "Pipeline": "pipeline", "Sampling": "sampling", "generate_speculative": "speculative",
    "TargetModel": "target", "TreeConfig": "tree", "open_drafter": "drafters",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vispec.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
