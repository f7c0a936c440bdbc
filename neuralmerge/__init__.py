"""neuralmerge: merge several trained CNNs into one compact model for CPU devices.

The public API is small: ``neuralmerge.merge`` (merge or compress ONNX models) and
``neuralmerge.plan`` (what a merge would do). Both need torch and faiss; they are imported on
first use so that the on-device runtime (``neuralmerge.runtime``) never pulls them in.
"""
__version__ = "0.1.0"

__all__ = ["merge", "plan", "__version__"]


def __getattr__(name):
    if name in ("merge", "plan"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'neuralmerge' has no attribute {name!r}")
