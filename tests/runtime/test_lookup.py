"""Lookup drafts: the chain found in the conversation, its graft onto the drafter's tree, and
the speculative loop with it (output equal to plain greedy decoding)."""
import numpy as np
import pytest

from vispec.runtime.acceptance import accept_greedy_choices
from vispec.runtime.generate import generate_plain
from vispec.runtime.lookup import PROBE, LookupGate, graft, lookup_chain
from vispec.runtime.session import Session
from vispec.runtime.tree import TreeConfig, build_draft_tree


def ids(*values):
    return np.array(values, np.int64)


def test_the_chain_follows_the_latest_occurrence_of_the_longest_suffix():
    context = ids(5, 6, 7, 1, 2, 9, 9, 6, 7, 3, 4, 1, 2, 6, 7)
    # "6 7" last occurred before "3 4"; no earlier "2 6 7"
    assert lookup_chain(context, 3).tolist() == [3, 4, 1]
    # "1 2 6 7" ... a three-token suffix that occurs wins over a later two-token one
    context = ids(1, 2, 3, 8, 2, 3, 9, 1, 2, 3)
    assert lookup_chain(context, 4).tolist() == [8, 2, 3, 9]
    assert lookup_chain(context, 4, ngrams=(2,)).tolist() == [9, 1, 2, 3]


def test_no_earlier_occurrence_no_chain():
    assert lookup_chain(ids(1, 2, 3, 4), 5).tolist() == []
    assert lookup_chain(ids(7), 5).tolist() == []
    assert lookup_chain(ids(4, 5, 4, 5), 5).tolist() == [4, 5]  # stops at the context's end


def _tree():
    """A (6, 2, 2) tree over fixed drafter choices: root 0, level 1 {10, 11}, then children."""
    children = {10: (20, 21), 11: (22, 23)}

    def step(tokens, parent_rows, mask, level):
        kids = np.array([children.get(int(t), (30 + level, 31 + level)) for t in tokens])
        return np.log(np.full(kids.shape, 0.5)), kids

    return build_draft_tree(0, np.log([0.6, 0.4]), np.array([10, 11]), step, TreeConfig(6, 2, 2))


def test_graft_follows_existing_nodes_and_appends_the_rest_parents_first():
    tree = _tree()
    grown = graft(tree, ids(10, 20, 40, 41))
    n = len(tree.tokens)
    assert grown.tokens[:n].tolist() == tree.tokens.tolist()
    assert grown.tokens[n:].tolist() == [40, 41]
    node_20 = int(np.flatnonzero(tree.tokens == 20)[0])
    assert grown.parents[n:].tolist() == [node_20, n]
    assert grown.depths[n:].tolist() == [tree.depths[node_20] + 1, tree.depths[node_20] + 2]
    assert all(grown.parents[i] < i for i in range(1, len(grown.parents)))
    for i in range(len(grown.tokens)):  # the mask row is the node and its ancestors
        chain, node = {i}, i
        while grown.parents[node] >= 0:
            node = int(grown.parents[node])
            chain.add(node)
        assert set(np.flatnonzero(grown.mask[i])) == chain
    # the target choosing the chain's tokens accepts the whole grafted path
    choice = np.full(len(grown.tokens), -1)
    for parent, token in zip([0, 1, node_20, n], [10, 20, 40, 41]):
        choice[parent] = token
    choice[n + 1] = 99
    verification = accept_greedy_choices(grown, choice)
    assert grown.tokens[verification.accepted].tolist() == [0, 10, 20, 40, 41]
    assert verification.next_token == 99


def test_a_chain_the_tree_holds_changes_nothing():
    tree = _tree()
    assert graft(tree, ids(11)) is tree


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("kind", ["eagle", "vispec", "hivis"])
def test_grafted_chains_right_or_wrong_keep_the_output_plain(runtime_pair, family, kind,
                                                            monkeypatch):
    """Whatever the lookup proposes, the target keeps its own tokens: chains that are the
    plain continuation (every other one wrong from its third token) are accepted past the
    (3,1,1) tree's two levels, and the output equals plain decoding."""
    import vispec.runtime.session as session_module

    target, drafter = runtime_pair(family, kind)
    tree = TreeConfig(3, 1, 1)
    prompt = target.prepare("the red boat sails over a calm sea", [])
    plain = generate_plain(target, prompt, 40).tokens
    calls = []

    def oracle(context, max_tokens):  # context: the prompt, the tokens so far, the root
        done = len(context) - len(prompt.input_ids)
        chain = np.array(plain[done:done + max_tokens], np.int64)
        calls.append(len(chain))
        if len(calls) % 2 and len(chain) > 2:
            chain[2] = 1 if chain[2] != 1 else 2
        return chain

    monkeypatch.setattr(session_module, "lookup_chain", oracle)
    with_lookup = Session(target, drafter, lookup=8).generate_speculative(prompt, 40, tree=tree)
    without = Session(target, drafter).generate_speculative(prompt, 40, tree=tree)
    assert with_lookup.tokens == plain == without.tokens
    assert calls and max(r.emitted for r in without.stats.rounds) <= 3
    assert max(r.emitted for r in with_lookup.stats.rounds) > 3
    assert len(with_lookup.stats.rounds) < len(without.stats.rounds)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_no_lookup_under_sampling_or_without_a_setting(runtime_pair, family, monkeypatch):
    import vispec.runtime.session as session_module
    from vispec.runtime.sampling import Sampling

    target, drafter = runtime_pair(family, "eagle")
    prompt = target.prepare("the red boat sails over a calm sea", [])
    calls = []
    monkeypatch.setattr(session_module, "lookup_chain",
                        lambda context, n: calls.append(n) or np.zeros(0, np.int64))
    Session(target, drafter, lookup=8).generate_speculative(
        prompt, 12, tree=TreeConfig(3, 1, 1), sampling=Sampling(temperature=0.8, seed=1))
    Session(target, drafter).generate_speculative(prompt, 12, tree=TreeConfig(3, 1, 1))
    assert calls == []


def test_the_gate_stops_a_kind_whose_grafts_miss_and_probes_it_again():
    gate = LookupGate()
    assert gate.wanted(False) and gate.wanted(True)  # the prior: worth a try
    for _ in range(20):
        gate.observe(True, grafted=8, accepted=0)
    wanted = [gate.wanted(True) for _ in range(2 * PROBE)]
    assert sum(wanted) == 2  # a probe every PROBE rounds
    assert gate.wanted(False)  # prompts without images keep their own record
    for _ in range(30):
        gate.observe(True, grafted=4, accepted=2)
    assert all(gate.wanted(True) for _ in range(PROBE))
