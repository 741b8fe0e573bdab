"""ONNX frontend: the same channel-space core on onnx.ModelProto graphs (no torch import).

The public API (:mod:`graphgrow.onnx.api`): :func:`widen`, :func:`deepen`, :func:`analyze`, :func:`check`.
"""

from .api import AnalysisResult, CheckResult, DeepenResult, WidenResult, analyze, check, deepen, widen

__all__ = ["widen", "deepen", "analyze", "check", "WidenResult", "DeepenResult", "AnalysisResult", "CheckResult"]
