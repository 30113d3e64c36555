"""A drafter with a draft vocabulary drafts only its ids, and output stays exact."""
import numpy as np
import pytest


class Recording:
    """A drafter session that records every token id it proposes."""

    def __init__(self, drafter):
        self.drafter, self.kind, self.top_k, self.proposed = drafter, drafter.kind, drafter.top_k, []

    def __getattr__(self, name):  # what the loop reads besides the calls recorded
        return getattr(self.drafter, name)

    def _keep(self, out):
        self.proposed.extend(np.asarray(out[1]).ravel().tolist())
        return out

    def prefill(self, *args):
        return self._keep(self.drafter.prefill(*args))

    def tree_step(self, *args):
        return self._keep(self.drafter.tree_step(*args))

    def advance(self, *args):
        return self._keep(self.drafter.advance(*args))


@pytest.mark.parametrize("family,kind", [("llava", "vispec"), ("qwen2_5_vl", "hivis"),
                                         ("llava_next", "eagle")])
def test_greedy_with_a_draft_vocabulary_equals_plain(draft_vocab_pair, assert_greedy_exact,
                                                     family, kind):
    target, drafter, ids = draft_vocab_pair(family, kind)
    recording = Recording(drafter)
    assert_greedy_exact(target, recording)
    assert recording.proposed and set(recording.proposed) <= set(ids.tolist())
    assert len(set(recording.proposed)) > 4  # not a degenerate head
