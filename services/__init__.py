"""Serving: ONNX Runtime sessions behind BentoML. Imports no torch and nothing from training/,
export/ or loadtest/: only the model contract and common/ (tests/test_structure.py checks it)."""
