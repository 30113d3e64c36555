"""Host-side glue of the supported families (importing this registers them)."""
from . import llava, qwen2_5_vl  # noqa: F401  (registration)
from .base import FamilyGlue, Prompt, glue_for, image_runs, register, supported_model_types

__all__ = ["FamilyGlue", "Prompt", "glue_for", "image_runs", "register", "supported_model_types"]
