"""Export: checkpoint -> single-file ONNX with its contract -> parity check -> BentoML model store."""
