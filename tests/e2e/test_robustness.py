"""Bad input is refused with a clear error; a failing drafter never costs a request."""

import json
import shutil

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_ptp.engine import TESTBED_ENGINE_KWARGS, shutdown_engine, speculative_config

pytestmark = pytest.mark.e2e


def start_engine(target_dir, checkpoint, k=8):
    return LLM(
        model=str(target_dir), speculative_config=speculative_config(checkpoint, k),
        **TESTBED_ENGINE_KWARGS,
    )


def test_checkpoint_for_another_target_is_refused_before_serving(
    target_dir, untrained_checkpoint, tmp_path
):
    other = tmp_path / "other-vocab"
    shutil.copytree(untrained_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["ptp_config"]["target"]["vocab_size"] = 32000
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="vocab_size: checkpoint 32000 vs target 49152"):
        start_engine(target_dir, other)


def test_impossible_k_is_refused_before_serving(target_dir, untrained_checkpoint):
    with pytest.raises(Exception, match="num_speculative_tokens=32 is outside"):
        start_engine(target_dir, untrained_checkpoint, k=32)


def test_quantized_kv_cache_is_refused_at_engine_start(target_dir, untrained_checkpoint, capfd):
    # The check runs in the engine's worker: its message reaches the engine's log, and the
    # caller gets vLLM's own start-up error.
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        LLM(model=str(target_dir), speculative_config=speculative_config(untrained_checkpoint, 4),
            **{**TESTBED_ENGINE_KWARGS, "kv_cache_dtype": "fp8"})
    assert "kv_cache_dtype='fp8' is not supported with PTP" in "".join(capfd.readouterr())


def test_corrupt_checkpoint_is_refused_before_serving(target_dir, untrained_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(untrained_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="corrupt or unreadable"):
        start_engine(target_dir, broken)


@pytest.mark.parametrize(
    "setting",
    [{"presence_penalty": 0.5}, {"repetition_penalty": 1.2}, {"logit_bias": {42: 5.0}},
     {"min_tokens": 4}, {"bad_words": ["Paris"]}],
)
def test_sampling_settings_ptp_cannot_honour_are_refused(engine, setting):
    with pytest.raises(VLLMValidationError, match="PTP speculative decoding cannot honour"):
        engine(8).generate(["Hello"], SamplingParams(max_tokens=4, **setting))


def _save_drafter(worker):
    drafter = worker.model_runner.drafter
    drafter.saved_draft_tokens = drafter._draft_tokens


def _break_drafter(worker):
    """Fault injection inside the engine's worker: the drafter returns garbage shapes."""
    worker.model_runner.drafter._draft_tokens = lambda batch: torch.zeros(3, 99, dtype=torch.long)


def _raise_in_drafter(worker):
    def fail(batch):
        raise RuntimeError("injected drafter fault")

    worker.model_runner.drafter._draft_tokens = fail


def _restore_drafter(worker) -> int:
    drafter = worker.model_runner.drafter
    drafter._draft_tokens = drafter.saved_draft_tokens
    failures, drafter.num_failures = drafter.num_failures, 0
    return failures


@pytest.mark.parametrize("fault", [_break_drafter, _raise_in_drafter])
def test_drafter_failure_falls_back_to_plain_decoding(engine, specbench_chats, fault):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in engine(None).chat(specbench_chats[:3], params)]
    llm = engine(8)
    llm.collective_rpc(_save_drafter)
    llm.collective_rpc(fault)
    try:
        outputs = llm.chat(specbench_chats[:3], params)
    finally:
        failures = llm.collective_rpc(_restore_drafter)[0]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # Every step's drafter pass failed and fell back; the error is logged on the first only
    # (PTPProposer.propose logs when num_failures reaches 1).
    assert failures >= 23


def test_preemption_and_recompute_change_nothing(target_dir, ptp_checkpoint, engine,
                                                 specbench_chats):
    # A KV cache of ~1.4k tokens for 16 requests growing to ~4k tokens forces preemption; the
    # recomputed requests must produce exactly the text of an engine with room to spare.
    chats = [[{"role": "user", "content": c[0]["content"][:1200]}] for c in specbench_chats[60:76]]
    params = [SamplingParams(max_tokens=96, seed=300 + i, temperature=0.7, top_p=0.95)
              for i in range(16)]
    expected = [o.outputs[0].token_ids for o in engine(8).chat(chats, params)]
    small = LLM(
        model=str(target_dir), speculative_config=speculative_config(ptp_checkpoint, 8),
        **{**TESTBED_ENGINE_KWARGS, "max_model_len": 1024, "kv_cache_memory_bytes": 64 << 20},
    )
    try:
        outputs = small.chat(chats, params)
    finally:
        shutdown_engine(small)
    assert [o.outputs[0].token_ids for o in outputs] == expected
