"""On-device runtime: lookup-table kernels and a graph executor for merged models.

Never imports torch, faiss or sklearn. Everything is loaded on first use, so importing this
package needs neither the compiled module ``neuralmerge._lut`` nor ``onnx``.

    from neuralmerge.runtime import Session
    out = Session("merged.onnx", lut="int8").run({"m0.input": x})
"""
_EXPORTS = {
    "Session": "session", "TensorSpec": "session", "NodeTime": "session", "FeedError": "session",
    "ModelError": "pack", "pack_model": "pack",
    "econv": "kernels", "egemm": "kernels", "KernelInputError": "kernels",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"neuralmerge.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'neuralmerge.runtime' has no attribute {name!r}")
