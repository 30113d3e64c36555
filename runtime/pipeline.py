"""One object for applications: load exported artifacts once, generate many times."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from PIL import Image

from .drafter_specs import ADAPTOR
from .errors import ManifestError, VispecError
from .families import Prompt
from .generate import GenerationResult, OnTokens, check_fits
from .lookup import LOOKUP
from .manifest import EXPORT_COMMAND, MANIFEST_NAME, Manifest
from .sampling import Sampling
from .session import Cancel, Session
from .target import TargetModel
from .tree_policy import AUTO, TreePolicy, TreeSetting, resolve_tree


def load_image(image) -> Image.Image:
    """A PIL image from a path or a PIL image, as RGB; a clear error for a bad file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise VispecError(f"image {path} is too large to open safely ({e}). Hint: downscale it "
                          f"first; the model's processor shrinks images anyway") from e
    except (OSError, ValueError) as e:
        raise VispecError(f"cannot read image {path}: {e}. Hint: pass a PNG/JPEG file") from e


def _check_artifacts(path: Path, what: str) -> Path:
    if not (path / MANIFEST_NAME).exists() and (path / "config.json").exists():
        raise ManifestError(f"{path} is a checkpoint folder, not exported {what} artifacts. "
                            f"Hint: run `vispec-export {EXPORT_COMMAND[what]}` on it first and "
                            f"pass the output")
    return path


class Pipeline:
    """Target (and optional drafter) artifacts plus one preallocated KV cache, loaded once;
    ``generate`` and ``chat`` reuse them for every request, in one ``Session`` (a request
    that extends the conversation replied to last prefills only its new rows).
    ``tree``: any ``tree_policy.TreeSetting`` ("auto": fitted to this machine, measured on
    first use; a ``TreeConfig``; None: the backend's default tree), resolved once by
    ``tree_policy()``; ``generate(..., tree=policy)`` overrides it for one call.
    ``drafter_image_input``: see ``drafters.open_drafter`` ("adaptor" or "official-llava15").
    ``keep_spinning``: the LM's thread pool spins on between steps (``TargetModel``); by
    default without a drafter. Pass False where other pipelines of the process (or other
    processes) decode on the same cores at the same time or right after (the workers spin
    ~40 ms past a generation's last step): spinning pools fight them.
    ``exact``: greedy speculative output bit-identical to plain output on any target,
    quantized ones included (``TargetModel``: passes of even row counts, chain trees only).
    ``lookup``: greedy rounds also verify up to this many tokens that followed the latest
    earlier occurrence of the conversation's last words (``Session``; 0: off).
    """

    def __init__(self, artifact_dir: str | os.PathLike, *,
                 drafter_dir: str | os.PathLike | None = None, backend: str = "ort",
                 threads: int | None = None, tree: TreeSetting = AUTO,
                 sampling: Sampling = Sampling(), drafter_image_input: str = ADAPTOR,
                 progress: Callable[[str], None] | None = None,
                 keep_spinning: bool | None = None, exact: bool = False,
                 lookup: int = LOOKUP):
        if threads is not None and threads < 1:
            raise VispecError(f"threads={threads}. Expected: >= 1. Hint: leave it unset for "
                              f"ONNX Runtime's default")
        if lookup < 0:
            raise VispecError(f"lookup={lookup}. Expected: >= 0 tokens (0: off). Hint: leave "
                              f"it at its default, {LOOKUP}")
        target_dir = _check_artifacts(Path(artifact_dir), "target")
        if drafter_dir is not None:  # a wrong drafter folder is told before the target loads
            Manifest.load(_check_artifacts(Path(drafter_dir), "drafter"), kind="drafter")
        self.target = TargetModel(target_dir, backend=backend, threads=threads,
                                  keep_spinning=drafter_dir is None if keep_spinning is None
                                  else keep_spinning, exact=exact)
        self.drafter = None
        if drafter_dir is not None:
            from .drafters import open_drafter
            self.drafter = open_drafter(Path(drafter_dir), self.target, backend=backend,
                                        threads=threads, image_input=drafter_image_input)
        self.drafter_dir = drafter_dir
        self.progress = progress
        self._tree = tree
        self._policy: TreePolicy | None = None  # resolved once; `auto` learns across calls
        self.sampling = sampling
        self.cache = self.target.new_cache()
        self.session = Session(self.target, self.drafter, self.cache, lookup)  # the conversation held
        if tree != AUTO:  # a fixed setting is checked now; `auto` measures on first use
            self.tree_policy()

    @property
    def tree(self) -> TreeSetting:
        """The tree setting as given (read-only: ``tree_policy()`` holds what it became)."""
        return self._tree

    def generate(self, prompt: str, images: list | None = None, max_new_tokens: int = 64,
                 draft: bool = True, on_tokens: OnTokens | None = None, *,
                 sampling: Sampling | None = None, tree: TreePolicy | None = None,
                 cancel: Cancel | None = None) -> GenerationResult:
        """Reply to one user turn (text + optional images: paths or PIL images).

        Speculative when a drafter is loaded and ``draft`` is True; plain otherwise.
        ``on_tokens`` is called with each pass's new token ids (streaming); ``sampling``
        and ``tree`` (a ``TreeConfig`` or another policy) override the pipeline's for this
        call; ``cancel`` ends it at the next pass.
        """
        if not prompt.strip():
            raise VispecError("the prompt is empty. Hint: pass the user message as --prompt")
        prepared = self.target.prepare(prompt, [load_image(i) for i in images or []])
        return self.reply(prepared, max_new_tokens, draft, on_tokens, sampling=sampling,
                          tree=tree, cancel=cancel)

    def chat(self, messages: list[dict], images: list | None = None, max_new_tokens: int = 64,
             draft: bool = True, on_tokens: OnTokens | None = None, *,
             sampling: Sampling | None = None, tree: TreePolicy | None = None,
             cancel: Cancel | None = None) -> GenerationResult:
        """The assistant's next reply to a conversation (HF chat messages; ``{"type":
        "image"}`` parts take ``images`` in order). A conversation that extends the one
        replied to last reuses its cached rows: only the new turn is prefilled."""
        prepared = self.target.glue.prepare_chat(self.target.processor, messages,
                                                 [load_image(i) for i in images or []])
        return self.reply(prepared, max_new_tokens, draft, on_tokens, sampling=sampling,
                          tree=tree, cancel=cancel)

    def reply(self, prompt: Prompt, max_new_tokens: int = 64, draft: bool = True,
              on_tokens: OnTokens | None = None, *, sampling: Sampling | None = None,
              tree: TreePolicy | None = None, cancel: Cancel | None = None
              ) -> GenerationResult:
        """Generate after a prepared prompt in this pipeline's session."""
        check_fits(prompt, max_new_tokens, self.target.max_len)  # before `auto` measures
        options = dict(sampling=sampling or self.sampling, on_tokens=on_tokens, cancel=cancel)
        if self.drafter is not None and draft:
            policy = self.tree_policy() if tree is None else tree
            return self.session.generate_speculative(prompt, max_new_tokens, tree=policy,
                                                     **options)
        return self.session.generate_plain(prompt, max_new_tokens, **options)

    def tree_policy(self) -> TreePolicy:
        """The policy of this pipeline's ``tree`` setting, resolved once (``auto`` measures
        this machine's costs on first use, or reads them from its cache)."""
        if self._policy is None:
            self._policy = resolve_tree(self._tree, self.target, self.drafter,
                                        self.drafter_dir, self.progress)
        return self._policy
