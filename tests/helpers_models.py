"""Shared test helpers: small zoo models in eval mode, exported to ONNX in a temporary folder."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from neuralmerge.zoo import architectures

# name -> (constructor kwargs, input shape without the batch dimension)
ZOO = {
    "LeNet": ({"num_classes": 10, "in_channels": 1, "image_size": 16}, (1, 16, 16)),
    "MobileNetStyle": ({"num_classes": 10, "in_channels": 3}, (3, 32, 32)),
    "YoloStyle": ({"num_classes": 4, "in_channels": 3}, (3, 32, 32)),
    "VGGStyle": ({"num_classes": 10, "in_channels": 3, "image_size": 32}, (3, 32, 32)),
    "ResNetStyle": ({"num_classes": 10, "in_channels": 3}, (3, 32, 32)),
}


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, so BN changes outputs."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A zoo model with seeded weights and randomised BN statistics, in eval mode."""
    kwargs, _ = ZOO[name]
    torch.manual_seed(seed)
    model = getattr(architectures, name)(**kwargs)
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def sample_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic input batch of the model's shape."""
    return torch.randn(batch, *ZOO[name][1], generator=torch.Generator().manual_seed(seed))


def export_model(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamo: bool = False,
                 fold_constants: bool = True) -> Path:
    """Export ``model`` to ``path`` with input ``input`` and output ``logits`` (dynamic batch).

    ``fold_constants=False`` (legacy exporter) keeps BatchNormalization nodes and shape subgraphs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=True, external_data=False, verbose=False)
        else:
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=False, do_constant_folding=fold_constants,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def export_zoo_model(name: str, tmp_path: Path, opset: int, dynamo: bool = False, seed: int = 0,
                     fold_constants: bool = True) -> Path:
    """Build zoo model ``name`` (see ``build_model``), export it at ``opset`` into ``tmp_path``, return the file."""
    tag = ("_dynamo" if dynamo else "") + ("" if fold_constants else "_unfolded")
    path = Path(tmp_path) / f"{name}_op{opset}{tag}_s{seed}.onnx"
    return export_model(build_model(name, seed), sample_input(name), path, opset, dynamo, fold_constants)


def run_ort(path_or_bytes, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run a model in onnxruntime (one thread, CPU)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)
