"""One object for applications: load exported artifacts once, generate many times."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .errors import ManifestError, VispecError
from .generate import GenerationResult, generate_plain
from .manifest import MANIFEST_NAME
from .target import TargetModel


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


class Pipeline:
    """Target artifacts + one preallocated KV cache; ``generate`` reuses both."""

    def __init__(self, artifact_dir: str | os.PathLike, *, backend: str = "ort",
                 threads: int | None = None):
        artifact_dir = Path(artifact_dir)
        if not (artifact_dir / MANIFEST_NAME).exists() and (artifact_dir / "config.json").exists():
            raise ManifestError(f"{artifact_dir} is a Hugging Face model folder, not exported "
                                f"artifacts. Hint: run `vispec-export export {artifact_dir} OUT` "
                                f"and pass OUT")
        self.target = TargetModel(artifact_dir, backend=backend, threads=threads)
        self.cache = self.target.new_cache()

    def generate(self, prompt: str, images: list | None = None,
                 max_new_tokens: int = 64) -> GenerationResult:
        """Greedy reply to one user turn (text + optional images: paths or PIL images)."""
        prepared = self.target.prepare(prompt, [load_image(i) for i in images or []])
        return generate_plain(self.target, prepared, max_new_tokens, cache=self.cache)
