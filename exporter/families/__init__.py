"""Export adapters of the supported families (importing this registers them)."""
from . import llava, qwen2_5_vl  # noqa: F401  (registration)
from .base import FamilyExport, export_adapter, register

__all__ = ["FamilyExport", "export_adapter", "register"]
