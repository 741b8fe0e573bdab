"""ONNX frontend: the same channel-space core on onnx.ModelProto graphs (no torch import)."""
