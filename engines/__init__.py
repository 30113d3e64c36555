"""TensorRT engines from exported ONNX graphs: profiles, INT8 Q/DQ, and the builder."""
from .build import BuildConfig, GraphPlan, build_engines, plan_build
from .profiles import graph_profiles, profile_shapes, split_dim, to_polygraphy
from .quantize import lm_calibration_feeds, prefill_feeds, qdq_session, quantize_qdq

__all__ = ["BuildConfig", "GraphPlan", "build_engines", "graph_profiles", "lm_calibration_feeds",
           "plan_build", "prefill_feeds", "profile_shapes", "qdq_session", "quantize_qdq", "split_dim",
           "to_polygraphy"]
