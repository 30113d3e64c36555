"""Where quantized weights may run: the manifest's ``weights`` precision against a backend.

``export --weights int4|int8`` (targets) and ``export-drafter --weights int8`` store graph
weights as ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized`` (weight-only, blockwise):
CPU kernels of ONNX Runtime 1.22 or later (the first with 8-bit ones). A TensorRT build of
an int4 target carries its weights in the engine (``vispec.engines.build``).
"""
from __future__ import annotations

from .errors import VispecError

FLOAT = "float32"
WEIGHTS = (FLOAT, "int8", "int4")
BITS = {"int8": 8, "int4": 4}
MIN_ORT = (1, 22)  # first ONNX Runtime with CPU kernels for 8-bit MatMulNBits


def require_weights_runtime(weights: str, backend: str, subject: str, *,
                            built: bool = False, hint: str = "export again without --weights") -> None:
    """Refuse ``weights`` (a manifest's precision) where they cannot run: quantized ONNX
    graphs run on the ``ort`` (CPU) backend with onnxruntime >= 1.22 only; ``built`` engines
    (TensorRT) carry their weights. ``subject`` names what needs them, ``hint`` the way out."""
    if weights == FLOAT or built:
        return
    if backend != "ort":
        raise VispecError(f"{subject}: {weights} weights run on ONNX Runtime's CPU provider "
                          f"only (backend {backend!r}). Hint: {hint} for a GPU")
    if not has_8bit_kernels():
        import onnxruntime
        raise VispecError(f"{subject}: {weights} weights need onnxruntime >= "
                          f"{'.'.join(map(str, MIN_ORT))} (installed: "
                          f"{onnxruntime.__version__}). Hint: pip install -U onnxruntime, or "
                          f"{hint}")


def has_8bit_kernels() -> bool:
    """Whether the installed ONNX Runtime has CPU kernels for 8-bit ``MatMulNBits``."""
    import onnxruntime
    return tuple(int(x) for x in onnxruntime.__version__.split(".")[:2]) >= MIN_ORT


def weight_graphs(facts: dict) -> set[str]:
    """The target graphs holding quantized weights, from the manifest's model facts: the
    ``lm`` (decoder layers, and the head unless excluded), the ``embed`` unless excluded."""
    if facts.get("weights", FLOAT) == FLOAT:
        return set()
    return {"lm"} | ({"embed"} if "embed" not in facts.get("weights_exclude", ()) else set())
