"""graphgrow: function-preserving growth (Net2Net) of neural networks by graph rewriting."""

from .errors import (GraphGrowError, InputMismatchError, InvalidArgumentError, ModelFileError, TraceError,
                     UnsupportedModelError, VerificationError)

__version__ = "0.1.0"


def __getattr__(name):
    # torch is imported lazily so that the ONNX path never pays for (or needs) it
    if name in ("widen", "deepen", "analyze"):
        from . import api

        return getattr(api, name)
    if name in ("upcycle", "grow_experts"):
        from . import moe

        return getattr(moe, name)
    if name == "grow_optimizer":
        from .optim import grow_optimizer

        return grow_optimizer
    if name == "check":
        from .verify import check

        return check
    if name in ("CheckReport", "OutputDiff"):
        from . import compare

        return getattr(compare, name)
    raise AttributeError(f"module 'graphgrow' has no attribute {name!r}")


__all__ = ["widen", "deepen", "analyze", "upcycle", "grow_experts", "grow_optimizer", "check", "CheckReport", "GraphGrowError", "InputMismatchError",
           "InvalidArgumentError", "ModelFileError", "TraceError", "UnsupportedModelError", "VerificationError"]
