"""Draft vocabulary (EAGLE-3 ``d2t`` / FR-Spec): the drafter's head keeps only N target ids.

The N most frequent token ids of the distillation data (``token_counts.json``, written by
``train-drafter`` beside the checkpoint) or of a corpus the user gives are kept, sorted; the
drafter's step graph scores only those rows of the LM head and maps its top-k back to target
ids with a Gather, so the runtime and the verification see target ids as before. Output stays
exact: the target verifies every drafted token (drafts are deterministic proposals).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vispec.runtime.errors import VispecError

COUNTS_FILE = "token_counts.json"  # {"vocab_size": V, "counts": {id: count}}
DRAFT_VOCAB_FILE = "draft_vocab.npy"  # the kept target ids, in the drafter's artifacts


def count_tokens(sequences: Iterable[Iterable[int]], vocab_size: int) -> np.ndarray:
    """Occurrences of every id ``[vocab_size]`` over ``sequences``."""
    counts = np.zeros(vocab_size, np.int64)
    for ids in sequences:
        np.add.at(counts, np.asarray(list(ids), np.int64), 1)
    return counts


def save_counts(folder: str | os.PathLike, counts: np.ndarray) -> Path:
    """Write ``counts`` (sparse) as ``folder/token_counts.json``."""
    path = Path(folder) / COUNTS_FILE
    seen = np.flatnonzero(counts)
    path.write_text(json.dumps({"vocab_size": len(counts),
                                "counts": {str(i): int(counts[i]) for i in seen}}))
    return path


def load_counts(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """Counts ``[vocab_size]`` from a ``token_counts.json``; a clear error if it is unusable."""
    try:
        raw = json.loads(Path(path).read_text())
        counts = np.zeros(vocab_size, np.int64)
        for i, n in raw["counts"].items():
            counts[int(i)] = int(n)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise VispecError(f"cannot read token counts from {path}: {e}. Hint: re-run "
                          f"train-drafter, or pass --vocab-corpus") from None
    return counts


def corpus_counts(path: str | os.PathLike, tokenizer, vocab_size: int) -> np.ndarray:
    """Counts of a UTF-8 text file tokenised line by line with the target's tokenizer."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VispecError(f"cannot read the vocabulary corpus {path}: {e}. Hint: pass a "
                          f"UTF-8 text file") from None
    ids = tokenizer([line for line in lines if line.strip()], add_special_tokens=False)
    counts = count_tokens(ids["input_ids"], vocab_size)
    if not counts.any():
        raise VispecError(f"the vocabulary corpus {path} has no text. Hint: pass a file with "
                          f"text like the replies the drafter will draft")
    return counts


def choose_draft_vocab(counts: np.ndarray, size: int, always: Iterable[int] = ()) -> np.ndarray:
    """The ``size`` most frequent ids (ties and unseen ids by id), ``always`` included, sorted."""
    vocab = len(counts)
    if not 1 <= size <= vocab:
        raise VispecError(f"draft vocabulary of {size} tokens. Expected: 1..{vocab} (the "
                          f"target's vocabulary). Hint: try about 8192 for a 49k vocabulary")
    forced = sorted({int(i) for i in always if 0 <= int(i) < vocab})[:size]
    order = np.lexsort((np.arange(vocab), -counts))  # by count desc, then id
    rest = order[~np.isin(order, forced)][:size - len(forced)]
    return np.sort(np.concatenate([np.asarray(forced, np.int64), rest]).astype(np.int64))


def coverage(counts: np.ndarray, ids: np.ndarray) -> float:
    """Share of the counted tokens that ``ids`` contains."""
    total = counts.sum()
    return float(counts[ids].sum() / total) if total else 0.0


def select_draft_vocab(size: int, target_model_dir: str | os.PathLike,
                       drafter_dir: str | os.PathLike, vocab_size: int,
                       corpus: str | os.PathLike | None = None) -> tuple[np.ndarray, float]:
    """The draft vocabulary's ids and their coverage of the counted tokens: counts of
    ``corpus`` if given, else the drafter's ``token_counts.json``; EOS ids always kept."""
    from vispec.runtime.families import glue_for
    from vispec.runtime.model_dir import read_config
    from vispec.runtime.processors import load_processor

    from ..export import eos_token_ids

    target_model_dir = Path(target_model_dir)
    counts_file = Path(drafter_dir) / COUNTS_FILE
    if corpus is not None:
        counts = corpus_counts(corpus, load_processor(target_model_dir).tokenizer, vocab_size)
    elif counts_file.is_file():
        counts = load_counts(counts_file, vocab_size)
    else:
        raise VispecError(f"a draft vocabulary needs token frequencies, and {drafter_dir} has "
                          f"no {COUNTS_FILE}. Hint: pass --vocab-corpus FILE (text like the "
                          f"replies to draft), or train the drafter with train-drafter")
    always = eos_token_ids(target_model_dir, glue_for(read_config(target_model_dir)))
    ids = choose_draft_vocab(counts, size, always)
    return ids, coverage(counts, ids)
