"""Scripts that build the small real models shipped in ``onnx_lowrank/data``."""
