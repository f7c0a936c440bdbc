"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, an unsupported op) raises a subclass of
``NeuralMergeError``. The CLI prints ``error: <message>`` on one line and exits non-zero;
tracebacks are shown only with ``-v``.
"""


class NeuralMergeError(Exception):
    """A problem with the user's input, described in one line."""


class ModelLoadError(NeuralMergeError):
    """An ONNX file is missing, truncated, corrupt or invalid."""


class UnsupportedOpError(NeuralMergeError):
    """The importer has no converter for an ONNX op."""


class ConfigError(NeuralMergeError):
    """A flag, preset or YAML config value is invalid."""
