"""One exception hierarchy for the whole package.

Library code raises these; the CLI maps them to exit codes. Every message states the
rule that was broken and the offending value.
"""


class EasyAnimateError(Exception):
    """Base class of every error raised on purpose by easyanimate-rt."""


class ConfigError(EasyAnimateError, ValueError):
    """A configuration field has an invalid value."""


class InputError(EasyAnimateError, ValueError):
    """A request (prompt, size, frame count, sampler, ...) breaks a rule."""


class ShapeError(InputError):
    """A tensor has a shape the network or engine cannot take."""


class CheckpointError(EasyAnimateError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


class ExportError(EasyAnimateError):
    """Exporting a network to ONNX failed or produced an invalid graph."""


class EngineError(EasyAnimateError):
    """Building, loading or running an inference engine failed."""


class NumericalError(EasyAnimateError):
    """A computation produced NaN or infinite values (the message names where)."""


class MissingDependencyError(EasyAnimateError, ImportError):
    """A library is missing; the message names the extra to install (``extra=""``: a
    base dependency, so the install itself is incomplete)."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" for {purpose}" if purpose else ""
        how = f'pip install "easyanimate-rt[{extra}]"' if extra else f"pip install {package} (a base dependency)"
        super().__init__(f"{package} is required{what}; install it with {how}")
        self.package = package
        self.extra = extra


class TrainingInterrupted(EasyAnimateError):
    """Raised after a stop signal, once the checkpoint of the last finished step is saved."""

    def __init__(self, step: int, checkpoint: object | None):
        super().__init__(f"training stopped at step {step}; resume with --resume "
                         f"(checkpoint: {checkpoint})")
        self.step = step
        self.checkpoint = checkpoint
