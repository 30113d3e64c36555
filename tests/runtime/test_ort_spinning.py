"""ONNX Runtime pool spinning: forced by VISPEC_ORT_SPINNING, else on only while the
cores the runner's threads need are free of other processes."""
import pytest

from vispec.runtime import cpu_load
from vispec.runtime.backends import ort as ort_backend


@pytest.fixture(autouse=True)
def fresh_choice():
    ort_backend.spinning.cache_clear()
    yield
    ort_backend.spinning.cache_clear()


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False)])
def test_the_environment_decides_when_set(monkeypatch, value, expected):
    monkeypatch.setenv(ort_backend.SPINNING_ENV, value)
    monkeypatch.setattr(ort_backend, "sample_cpu", lambda: pytest.fail("sampled the load"))
    assert ort_backend.spinning(2) is expected


@pytest.mark.parametrize(("others", "threads", "cores", "expected"), [
    (0.0, 2, 2, True), (0.2, 2, 2, True), (1.0, 2, 2, False),
    (1.0, 2, 4, True), (3.5, 2, 4, False), (1.0, None, 2, False)])
def test_otherwise_others_cpu_use_decides(monkeypatch, others, threads, cores, expected):
    monkeypatch.delenv(ort_backend.SPINNING_ENV, raising=False)
    monkeypatch.setattr(ort_backend, "LOAD_SAMPLE_SECONDS", 0.0)
    monkeypatch.setattr(ort_backend.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(ort_backend, "contention",
                        lambda *args: cpu_load.Contention(others, ()))
    assert ort_backend.spinning(threads) is expected


def test_the_choice_is_made_once_per_thread_count(monkeypatch):
    monkeypatch.delenv(ort_backend.SPINNING_ENV, raising=False)
    monkeypatch.setattr(ort_backend, "LOAD_SAMPLE_SECONDS", 0.0)
    samples = []
    real = ort_backend.sample_cpu
    monkeypatch.setattr(ort_backend, "sample_cpu", lambda: samples.append(1) or real())
    first = ort_backend.spinning(2)
    assert ort_backend.spinning(2) is first and len(samples) == 2
