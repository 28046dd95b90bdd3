"""Serving: ONNX Runtime sessions behind BentoML. Imports no torch and nothing from training/."""
