"""vispec.runtime: run exported VLM targets and drafters with no torch installed.

    from vispec.runtime import Pipeline, Sampling, TreeConfig
    pipe = Pipeline("artifacts/target", drafter_dir="artifacts/drafter")
    print(pipe.generate("What is in the picture?", images=["cat.jpg"]).text)
"""
from .drafters import open_drafter
from .generate import GenerationResult, GenerationStats, generate_plain
from .pipeline import Pipeline
from .sampling import Sampling
from .speculative import generate_speculative
from .target import TargetModel
from .tree import TreeConfig

__all__ = ["GenerationResult", "GenerationStats", "Pipeline", "Sampling", "TargetModel",
           "TreeConfig", "generate_plain", "generate_speculative", "open_drafter"]
