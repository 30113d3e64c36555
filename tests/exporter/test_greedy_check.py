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
