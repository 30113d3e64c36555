"""Drafter export: official checkpoints -> PyTorch modules -> ONNX graphs (fuse, step, adaptor)."""
from .checkpoint import build_tiny_drafter, load_drafter, write_checkpoint
from .export import export_drafter, validate_drafter

__all__ = ["build_tiny_drafter", "export_drafter", "load_drafter", "validate_drafter",
           "write_checkpoint"]
