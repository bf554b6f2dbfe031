"""Measurement with onnxruntime: inputs, sessions, accuracy, latency, mobile, size, calibration, ARM64."""
