"""Runtime fixtures: tiny targets opened with their drafters."""
import pytest

from vispec.runtime.drafters import open_drafter
from vispec.runtime.target import TargetModel


@pytest.fixture(scope="session")
def runtime_pair(tiny_target, tiny_drafter):
    """``runtime_pair(family, kind, seed) -> (TargetModel, DrafterSession)``, opened once."""
    opened, targets = {}, {}

    def get(family, kind, seed=0):
        if family not in targets:
            targets[family] = TargetModel(tiny_target(family)[1])
        if (family, kind, seed) not in opened:
            _, artifacts = tiny_drafter(kind, family, seed)
            opened[family, kind, seed] = open_drafter(artifacts, targets[family])
        return targets[family], opened[family, kind, seed]

    return get


CORPUS = ("the red boat sails over a calm sea while birds fly and a child waves\n"
          "tell me about the sea and the sky, describe the picture in detail\n")
DRAFT_VOCAB = 96  # of the tiny targets' 480


@pytest.fixture(scope="session")
def draft_vocab_pair(tiny_target, tiny_drafter, tmp_path_factory):
    """``draft_vocab_pair(family, kind) -> (TargetModel, DrafterSession, draft ids)``: the
    seed-0 tiny drafter exported with a draft vocabulary chosen from a small corpus."""
    import numpy as np

    from vispec.exporter.drafters.draft_vocab import DRAFT_VOCAB_FILE
    from vispec.exporter.drafters.export import export_drafter

    opened = {}

    def get(family, kind):
        if (family, kind) not in opened:
            model_dir, artifacts = tiny_target(family)
            drafter_dir, _ = tiny_drafter(kind, family)
            root = tmp_path_factory.mktemp(f"dv-{kind}-{family}")
            (root / "corpus.txt").write_text(CORPUS)
            export_drafter(drafter_dir, model_dir, root / "artifacts", top_k=4, max_len=256,
                           draft_vocab=DRAFT_VOCAB, vocab_corpus=root / "corpus.txt")
            target = TargetModel(artifacts)
            opened[family, kind] = (target, open_drafter(root / "artifacts", target),
                                    np.load(root / "artifacts" / DRAFT_VOCAB_FILE))
        return opened[family, kind]

    return get
