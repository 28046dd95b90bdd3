"""Load tests and protocol benchmarks against a running server (127.0.0.1 only)."""
