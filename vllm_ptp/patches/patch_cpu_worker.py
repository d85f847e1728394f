"""Build the PTP model runner in vLLM's CPU worker when the speculator is PTP.

Why: coupled verification replaces vLLM's sampler and rejection sampler, and the drafter needs
the runner's KV cache and block tables; vLLM 0.32 has no hook for either. How: the CPU worker
looks up `CPUModelRunner` in its module at device init; we put a factory there that returns
`PTPCPUModelRunner` for PTP configs and vLLM's runner otherwise. Remove when vLLM lets plugins
provide a sampler / proposer per speculative method.
"""

from vllm.v1.worker import cpu_worker


def apply() -> None:
    original = cpu_worker.CPUModelRunner
    if getattr(original, "_ptp_patched", False):
        return

    def make_runner(vllm_config, device):
        from vllm_ptp.plugin import ptp_checkpoint_of

        if ptp_checkpoint_of(vllm_config.speculative_config) is None:
            return original(vllm_config, device)
        from vllm_ptp.runner import PTPCPUModelRunner

        return PTPCPUModelRunner(vllm_config, device)

    make_runner._ptp_patched = True
    cpu_worker.CPUModelRunner = make_runner
