"""A session keeps a conversation's caches: a next turn prefills only its new rows (target
and drafter), and its output equals generating on the whole conversation from scratch."""
import numpy as np
import pytest

from vispec.runtime.generate import generate_plain
from vispec.runtime.session import Session
from vispec.runtime.tree import TreeConfig

TREE = TreeConfig(8, 2, 3)
FIRST, SECOND = "Describe the red boat and what is around it.", "And what about the sea?"


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def turns(target, images_1, images_2, reply=None):
    """The first turn's prompt, or (with the first reply) the conversation's second."""
    messages = [user(FIRST, len(images_1))]
    if reply is not None:
        messages += [{"role": "assistant", "content": [{"type": "text", "text": reply}]},
                     user(SECOND, len(images_2))]
    images = images_1 + (images_2 if reply is not None else [])
    return target.glue.prepare_chat(target.processor, messages, images)


def generate(session, prompt, speculative, n=16):
    if speculative:
        return session.generate_speculative(prompt, n, tree=TREE)
    return session.generate_plain(prompt, n)


def image_sets(noise_image):
    return {"text": ([], []), "image": ([noise_image(56, 56, 3)], []),
            "new image": ([noise_image(56, 56, 3)], [noise_image(56, 84, 4)])}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("kind", ["plain", "eagle", "vispec", "hivis"])
@pytest.mark.parametrize("images", ["text", "image", "new image"])
def test_turn_2_reuses_the_cache_and_equals_generating_it_from_scratch(
        runtime_pair, noise_image, family, kind, images):
    target, drafter = runtime_pair(family, "eagle" if kind == "plain" else kind)
    speculative = kind != "plain"
    images_1, images_2 = image_sets(noise_image)[images]
    session = Session(target, drafter if speculative else None)
    first = turns(target, images_1, images_2)
    reply = generate(session, first, speculative)
    second = turns(target, images_1, images_2, reply.text)
    drafter_prefills = drafter.prefills
    result = generate(session, second, speculative)
    assert result.tokens == generate_plain(target, second, 16).tokens
    stats = result.stats
    assert len(first.input_ids) - 1 <= stats.reused_tokens < len(second.input_ids)
    assert stats.prompt_tokens == len(second.input_ids)
    if speculative:  # the drafter continued its prompt rows: one prefill call this turn
        assert drafter.prefills == drafter_prefills + 1
        assert drafter.prompt_end == len(second.input_ids) - 1


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("kind", ["eagle", "vispec", "hivis"])
@pytest.mark.parametrize("first_turn", ["speculative", "plain"])
def test_appended_rows_hold_what_a_fresh_prefill_puts_in_both_caches(
        runtime_pair, noise_image, family, kind, first_turn):
    """After a speculative turn the drafter continues its prompt rows; after a plain one
    (or `auto` decoding plainly) it builds them from the rows the session holds."""
    target, drafter = runtime_pair(family, kind)
    images_1, images_2 = image_sets(noise_image)["new image"]
    session = Session(target, drafter)
    reply = generate(session, turns(target, images_1, images_2), first_turn == "speculative")
    second = turns(target, images_1, images_2, reply.text)
    rows = len(second.input_ids)

    def prompt_rows(sess):
        sess.generate_speculative(second, 2, tree=TREE)
        assert sess.rows[:rows] == second.input_ids.tolist()
        n = drafter.prompt_rows + 1  # the drafter's rows of the prompt, x_L's included
        return (sess.cache.to_host()[:, :, :rows].copy(),
                drafter.cache.to_host()[:, :, :n].copy(), sess.features[:rows].copy())

    prefills = drafter.prefills
    reused = prompt_rows(session)
    assert session.rows and drafter.prefills == prefills + 1
    assert session.generate_speculative(second, 2, tree=TREE).stats.reused_tokens == rows - 1
    fresh = prompt_rows(Session(target, drafter))
    for got, want in zip(reused, fresh):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_conversation_that_differs_is_prefilled_from_the_difference(runtime_pair, noise_image):
    target, drafter = runtime_pair("llava", "vispec")
    session = Session(target, drafter)
    image, other = noise_image(56, 56, 3), noise_image(56, 56, 9)
    reply = session.generate_speculative(turns(target, [image], []), 12, tree=TREE)
    # Same tokens, another image in turn 1: rows from that image's first slot are dropped.
    changed = turns(target, [other], [], reply.text)
    result = session.generate_speculative(changed, 12, tree=TREE)
    slot = target.glue.image_slots(changed)[0]
    assert result.tokens == generate_plain(target, changed, 12).tokens
    assert result.stats.reused_tokens == slot and drafter.prompt_end == len(changed.input_ids) - 1
    plain = session.generate_plain(turns(target, [image], [], reply.text), 12)
    assert 0 < plain.stats.reused_tokens <= slot and plain.stats.dropped_tokens > 0
    # Another first message: only the template's common start is kept.
    other_text = target.glue.prepare_chat(target.processor, [user("Tell me a story.")])
    again = session.generate_plain(other_text, 12)
    assert again.tokens == generate_plain(target, other_text, 12).tokens
    assert again.stats.reused_tokens < 8


def test_the_same_prompt_again_reruns_only_its_last_row(runtime_pair):
    target, drafter = runtime_pair("qwen2_5_vl", "hivis")
    session = Session(target, drafter)
    prompt = turns(target, [], [])
    first = session.generate_speculative(prompt, 12, tree=TREE)
    again = session.generate_speculative(prompt, 12, tree=TREE)
    assert again.tokens == first.tokens
    assert again.stats.reused_tokens == len(prompt.input_ids) - 1


def test_cancel_ends_a_generation_at_the_next_pass(runtime_pair):
    target, drafter = runtime_pair("llava", "eagle")
    passes = []
    result = Session(target, drafter).generate_speculative(
        turns(target, [], []), 40, tree=TREE, cancel=lambda: len(passes) >= 2,
        on_tokens=passes.append)
    assert len(passes) == 2 and result.stats.target_passes == 2
    assert result.tokens == generate_plain(target, turns(target, [], []), 40).tokens[:len(result.tokens)]
