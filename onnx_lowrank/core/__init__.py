"""The numerical core: numpy only, no onnx, no onnxruntime."""
