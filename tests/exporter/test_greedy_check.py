"""validate's greedy check: fp32 passes when identical or when it first differs at a tie."""
from vispec.exporter.report import GreedyCheck
from vispec.runtime.ties import TIE_TOLERANCE, Divergence


def check(divergence):
    return GreedyCheck(runtime=[5, 7, 9], reference=[5, 8, 2], divergence=divergence)


def test_a_tie_flip_passes_and_is_reported():
    result = check(Divergence(1, 3e-6, TIE_TOLERANCE["float32"]))
    assert result.passed
    assert "tie flip at token 1" in result.summary()


def test_a_difference_that_is_no_tie_fails():
    result = check(Divergence(1, 2e-3, TIE_TOLERANCE["float32"]))
    assert not result.passed
    assert "DIFFERENT" in result.summary()
    assert GreedyCheck([1, 2], [1, 2]).passed


def test_first_divergence_at_the_first_token(tiny_target):
    """A difference at token 0 is judged from the prompt's own pass."""
    from vispec.runtime.generate import generate_plain
    from vispec.runtime.target import TargetModel
    from vispec.runtime.ties import first_divergence

    target = TargetModel(tiny_target("llava")[1])
    prompt = target.prepare("hi")
    first = generate_plain(target, prompt, 1).tokens[0]
    other = (first + 1) % 100
    divergence = first_divergence(target, prompt, [first], [other])
    assert divergence.position == 0 and divergence.gap > TIE_TOLERANCE["float32"]
