"""One object for applications: load exported artifacts once, generate many times."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .errors import ManifestError, VispecError
from .generate import GenerationResult, generate_plain
from .manifest import MANIFEST_NAME
from .sampling import Sampling
from .speculative import generate_speculative
from .target import TargetModel
from .tree import TreeConfig


def load_image(image) -> Image.Image:
    """A PIL image from a path or a PIL image, as RGB; a clear error for a bad file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise VispecError(f"cannot read image {path}: {e}. Hint: pass a PNG/JPEG file") from e


def _check_artifacts(path: Path, what: str) -> Path:
    if not (path / MANIFEST_NAME).exists() and (path / "config.json").exists():
        raise ManifestError(f"{path} is a checkpoint folder, not exported {what} artifacts. "
                            f"Hint: run `vispec-export export` on it first and pass the output")
    return path


class Pipeline:
    """Target (and optional drafter) artifacts plus one preallocated KV cache, loaded once;
    ``generate`` reuses them for every request."""

    def __init__(self, artifact_dir: str | os.PathLike, *,
                 drafter_dir: str | os.PathLike | None = None, backend: str = "ort",
                 threads: int | None = None, tree: TreeConfig | None = None,
                 sampling: Sampling = Sampling()):
        self.target = TargetModel(_check_artifacts(Path(artifact_dir), "target"),
                                  backend=backend, threads=threads)
        self.drafter = None
        if drafter_dir is not None:
            from .drafters import open_drafter
            self.drafter = open_drafter(_check_artifacts(Path(drafter_dir), "drafter"),
                                        self.target, backend=backend, threads=threads)
        self.tree = tree  # None: the backend's default tree for the drafter
        self.sampling = sampling
        self.cache = self.target.new_cache()

    def generate(self, prompt: str, images: list | None = None, max_new_tokens: int = 64,
                 draft: bool = True) -> GenerationResult:
        """Reply to one user turn (text + optional images: paths or PIL images).

        Speculative when a drafter is loaded and ``draft`` is True; plain otherwise.
        """
        prepared = self.target.prepare(prompt, [load_image(i) for i in images or []])
        if self.drafter is not None and draft:
            return generate_speculative(self.target, self.drafter, prepared, max_new_tokens,
                                        tree=self.tree, sampling=self.sampling,
                                        cache=self.cache)
        return generate_plain(self.target, prepared, max_new_tokens, cache=self.cache,
                              sampling=self.sampling)
