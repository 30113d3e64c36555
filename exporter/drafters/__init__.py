"""Drafter export: official checkpoints -> PyTorch modules -> ONNX graphs (fuse, step, adaptor)."""
from .checkpoint import load_drafter, write_checkpoint
from .export import export_drafter, validate_drafter

__all__ = ["export_drafter", "load_drafter", "validate_drafter", "write_checkpoint"]
