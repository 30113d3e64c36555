"""Draft vocabularies: the chosen ids, the exported head against PyTorch, and bad input."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from vispec.exporter.cli import cli
from vispec.exporter.drafters.draft_vocab import (
    COUNTS_FILE,
    DRAFT_VOCAB_FILE,
    choose_draft_vocab,
    count_tokens,
    save_counts,
)
from vispec.exporter.drafters.export import export_drafter, validate_drafter
from vispec.runtime.errors import VispecError


def test_most_frequent_ids_kept_eos_forced_sorted():
    counts = count_tokens([[5, 5, 5, 2, 2, 9], [9, 9, 9, 1]], vocab_size=12)
    assert list(counts[[1, 2, 5, 9]]) == [1, 2, 3, 4]
    assert list(choose_draft_vocab(counts, 3)) == [2, 5, 9]
    assert list(choose_draft_vocab(counts, 3, always=[11])) == [5, 9, 11]
    assert list(choose_draft_vocab(counts, 6)) == [0, 1, 2, 3, 5, 9]  # unseen ids by id
    for bad in (0, 13):
        with pytest.raises(VispecError, match="Hint:"):
            choose_draft_vocab(counts, bad)


def test_export_with_counts_from_training_matches_pytorch(tiny_target, tiny_drafter, tmp_path):
    model_dir, _ = tiny_target("llava")
    drafter_dir, _ = tiny_drafter("hivis", "llava")
    with_counts = tmp_path / "drafter"
    with_counts.mkdir()
    for f in drafter_dir.iterdir():
        (with_counts / f.name).write_bytes(f.read_bytes())
    save_counts(with_counts, count_tokens([[7] * 50 + list(range(100, 140))], 480))
    manifest = export_drafter(with_counts, model_dir, tmp_path / "out", top_k=4, max_len=256,
                              draft_vocab=32)
    ids = np.load(tmp_path / "out" / DRAFT_VOCAB_FILE)
    assert manifest.model["draft_vocab"] == 32 and len(ids) == 32 and 7 in ids
    rows = validate_drafter(with_counts, model_dir, tmp_path / "out")
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_cli_draft_vocab_needs_frequencies(tiny_target, tiny_drafter, tmp_path):
    model_dir, _ = tiny_target("llava")
    drafter_dir, _ = tiny_drafter("eagle", "llava")
    assert not (drafter_dir / COUNTS_FILE).exists()
    args = ["export-drafter", str(drafter_dir), str(tmp_path / "out"), "--target", str(model_dir)]
    no_counts = CliRunner().invoke(cli, args + ["--draft-vocab", "64"])
    corpus_alone = CliRunner().invoke(cli, args + ["--vocab-corpus", str(model_dir / "config.json")])
    too_small = CliRunner().invoke(cli, args + ["--draft-vocab", "2", "--top-k", "4",
                                                "--vocab-corpus", str(model_dir / "config.json")])
    for result in (no_counts, corpus_alone, too_small):
        assert result.exit_code == 2 and result.output.startswith("error: ") \
            and "Hint:" in result.output, result.output
    assert "--vocab-corpus" in no_counts.output
    assert not (tmp_path / "out").exists()
    json.loads((model_dir / "config.json").read_text())  # the inputs are untouched
