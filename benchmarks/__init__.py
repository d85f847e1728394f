"""Benchmarks of vllm-ptp (importable so that `vllm-ptp bench` and tests can reuse them)."""
