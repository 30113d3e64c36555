"""Drafter sessions (EAGLE, ViSpec, HiViS) over exported drafter graphs; numpy only."""
from . import kinds  # noqa: F401  (registration)
from .session import DrafterSession, open_drafter, register

__all__ = ["DrafterSession", "open_drafter", "register"]
