"""The gated-LoRA drafter against the transformers target it is built on."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_ptp import ops
from vllm_ptp.checkpoint import init_checkpoint, load_checkpoint
from vllm_ptp.config import TargetIdentity
from vllm_ptp.models.gated_lora_llama import (
    PROJECTION_GROUPS,
    AdaptedProjection,
    DraftQuery,
    GroupAdapter,
    KVContext,
    adapted_projection,
    draft_query,
)
from vllm_ptp.models.quantized import (
    COMPACT_FORMATS,
    Bf16Linear,
    LoraFusedLinear,
    PanelLinear,
    PanelLoraLinear,
    RowSplitLinear,
    _recover_weight,
    compact_linear,
    compact_view,
    has_bf16_gemms,
)
from vllm_ptp.models.target import from_hf_llama


@pytest.fixture(scope="module")
def hf_target(target_dir):
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


@pytest.fixture
def drafter(hf_target, untrained_checkpoint):
    drafter = load_checkpoint(untrained_checkpoint, TargetIdentity.from_hf_config(hf_target.config))
    drafter.bind_target(from_hf_llama(hf_target))
    return drafter


def run_rows(drafter, hf_target, ids, context_len, lora_gate):
    """Compute rows ids[context_len:] with the drafter, context K/V from the HF target."""
    with torch.no_grad():
        cache = hf_target(ids[:, :context_len], use_cache=True).past_key_values
        rows = ids.shape[1] - context_len
        query = DraftQuery(
            inputs_embeds=hf_target.model.embed_tokens(ids[:, context_len:]),
            positions=torch.arange(context_len, ids.shape[1])[None],
            lora_gate=lora_gate,
            self_mask=torch.ones(rows, rows, dtype=torch.bool).tril()[None],
            context_mask=torch.ones(1, rows, context_len, dtype=torch.bool),
        )
        return drafter.logits(
            drafter(query, KVContext(lambda i: (cache.layers[i].keys, cache.layers[i].values),
                                     drafter.target.num_heads))
        )[0]


def test_adapters_off_reproduces_the_target(drafter, hf_target):
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7493, 30, 378, 1345, 314]])
    with torch.no_grad():
        reference = hf_target(ids).logits[0, 6:]
    logits = run_rows(drafter, hf_target, ids, 6, torch.zeros(1, 5, dtype=torch.bool))
    torch.testing.assert_close(logits, reference, atol=1e-3, rtol=1e-4)


def test_adapters_act_only_on_gated_rows(drafter, hf_target):
    with torch.no_grad():
        for adapters in drafter.lora:
            for adapter in adapters.values():
                adapter.lora_B.normal_(std=0.05)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7493, 30, 378]])
    gate = torch.tensor([[False, False, True]])
    gated = run_rows(drafter, hf_target, ids, 6, gate)
    plain = run_rows(drafter, hf_target, ids, 6, torch.zeros_like(gate))
    # Causal: rows before the first gated row are untouched; the gated row changes.
    torch.testing.assert_close(gated[:2], plain[:2])
    assert not torch.allclose(gated[2], plain[2])


@pytest.mark.parametrize("modules", [None, ("q_proj", "v_proj", "up_proj")])
def test_adapters_grouped_for_serving_match_training(hf_target, target_dir, tmp_path, modules):
    """Serving stacks each fused projection's adapters once (prepare_for_serving); training
    stacks them per forward. Both must give the same rows, also when only some projections of
    a group are adapted (zero blocks in the stacked B)."""
    overrides = {"lora_modules": modules} if modules else {}
    checkpoint = init_checkpoint(target_dir, tmp_path / "c", **overrides)
    drafter = load_checkpoint(checkpoint, TargetIdentity.from_hf_config(hf_target.config))
    drafter.bind_target(from_hf_llama(hf_target))
    with torch.no_grad():
        for adapter in drafter.lora.modules():
            if hasattr(adapter, "lora_B"):
                adapter.lora_B.normal_(std=0.05)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7493, 30, 378]])
    gate = torch.tensor([[False, True, True]])
    trained = run_rows(drafter, hf_target, ids, 6, gate)
    drafter.prepare_for_serving()
    served = run_rows(drafter, hf_target, ids, 6, gate)
    torch.testing.assert_close(served, trained)
    assert not torch.allclose(served[1:], run_rows(drafter, hf_target, ids, 6, ~gate)[1:])


def test_shallow_drafter_reads_its_top_layers_and_the_previous_hidden_state(
    hf_target, target_dir, tmp_path
):
    checkpoint = init_checkpoint(target_dir, tmp_path / "shallow", num_draft_layers=4)
    drafter = load_checkpoint(checkpoint, TargetIdentity.from_hf_config(hf_target.config))
    drafter.bind_target(from_hf_llama(hf_target))
    assert drafter.adapts_token_row  # the newest token enters below its depth
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7493]])
    with torch.no_grad():
        out = hf_target(ids[:, :-1], use_cache=True, output_hidden_states=True)
        read = []

        def context(layer):
            read.append(layer)
            return out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values

        def draft(previous_hidden):
            token_row = drafter.token_row(hf_target.model.embed_tokens(ids[:, -1]), previous_hidden)
            embeds = torch.cat((token_row[:, None], drafter.u_embedding(torch.rand(1, 3))), dim=1)
            query = draft_query(embeds, torch.tensor([6]), 6, drafter.adapts_token_row)
            return drafter.logits(drafter(query, KVContext(context, drafter.target.num_heads)))

        logits = draft(out.hidden_states[-1][:, -1])
        assert read[:4] == [26, 27, 28, 29]
        assert logits.shape == (1, 4, hf_target.config.vocab_size) and logits.isfinite().all()
        assert not torch.allclose(logits, draft(torch.zeros_like(out.hidden_states[-1][:, -1])))


def test_dependency_head_drafts_are_its_training_logits_argmax_among_candidates(
    hf_target, target_dir, tmp_path
):
    config = TargetIdentity.from_hf_config(hf_target.config)
    path = init_checkpoint(target_dir, tmp_path / "c", dependency_head=32, dependency_candidates=8)
    drafter = load_checkpoint(path, config).eval()
    drafter.bind_target(from_hf_llama(hf_target))
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, config.hidden_size)
    first = torch.randint(config.vocab_size, (3,))
    with torch.no_grad():
        logits = drafter.logits(hidden)
        plain = logits[:, 2:].argmax(dim=-1)
        # A new head (zero output) changes no draft.
        assert torch.equal(drafter.later_drafts(hidden[:, 2:], logits[:, 2:], first), plain)
        drafter.dependency_head.out.weight.normal_(std=0.2)
        drafts = drafter.later_drafts(hidden[:, 2:], logits[:, 2:], first)
        # Serving re-ranks each row's top candidates, knowing the draft before it; training
        # scores the whole vocabulary given the true previous token. Fed the served drafts as
        # previous tokens, training's scores pick the same drafts among the same candidates.
        previous = torch.cat((first[:, None], drafts[:, :-1]), dim=1)
        dependent = drafter.dependent_logits(hidden[:, 2:], logits[:, 2:], previous)
        candidates = logits[:, 2:].topk(8, dim=-1).indices
        best = dependent.gather(-1, candidates).argmax(dim=-1, keepdim=True)
    assert torch.equal(drafts, candidates.gather(-1, best)[..., 0])
    assert not torch.equal(drafts, plain)


def test_u_embedding_interpolates_between_learned_vectors(drafter):
    embedding = drafter.u_embedding
    vectors = embedding.weight
    last = vectors.shape[0] - 1
    torch.testing.assert_close(embedding(torch.tensor([0.0]))[0], vectors[0])
    torch.testing.assert_close(embedding(torch.tensor([1.0]))[0], vectors[last])
    midpoint = embedding(torch.tensor([0.5 / last]))[0]
    torch.testing.assert_close(midpoint, (vectors[0] + vectors[1]) / 2)


def compact_formats() -> list:
    """The compact draft-weight formats this CPU can run (bf16 needs bf16 GEMMs, fp16 and w8a32
    AVX2)."""
    simd = ops.simd_kernels()
    runs = {"bf16": has_bf16_gemms(), "fp16": simd, "w8a32": simd,
            "w8a32-bf16": has_bf16_gemms() and simd, "int8": True}
    return [pytest.param(f, marks=pytest.mark.skipif(not runs[f], reason=f"no {f} GEMM here"))
            for f in COMPACT_FORMATS]


@pytest.mark.parametrize("weight_format", compact_formats())
def test_compact_draft_weights_stay_close_to_the_target(
    drafter, hf_target, target_dir, weight_format
):
    target, config = drafter.target, hf_target.config
    # Applying a projection to the identity recovers its weight exactly.
    recovered = _recover_weight(target.layers[0].o_proj, config.hidden_size, torch.float32)
    assert torch.equal(recovered, hf_target.model.layers[0].self_attn.o_proj.weight)
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built "
            "in 1889 for the World's Fair, and for its museums such as the Louvre.")
    ids = AutoTokenizer.from_pretrained(target_dir)(text, return_tensors="pt").input_ids
    rows = 9  # a drafter pass's rows at k=8, over cached context
    gate = torch.zeros(1, rows, dtype=torch.bool)  # adapters off: the target itself

    def passes():
        return torch.cat([
            run_rows(drafter, hf_target, ids[:, : start + rows], start, gate)
            for start in range(4, ids.shape[1] - rows + 1, rows)
        ])

    exact = passes()
    drafter.bind_target(compact_view(target, compact_linear(weight_format), config.hidden_size,
                                     config.intermediate_size, drafter.layer_indices))
    approximate = passes()
    top5 = approximate.topk(5, dim=-1).indices
    assert (top5 == exact.argmax(-1, keepdim=True)).any(-1).all()
    agreement = (approximate.argmax(-1) == exact.argmax(-1)).float().mean()
    # 18 positions: one argmax that rounding flips is allowed (oneDNN bf16 on a Zen 4 flips one)
    assert agreement >= (0.8 if weight_format == "int8" else 0.9)


def test_compact_weights_reject_unknown_formats():
    with pytest.raises(ValueError, match="'fp8' is not one of"):
        compact_linear("fp8")


@pytest.mark.skipif(not (has_bf16_gemms() and ops.simd_kernels()), reason="no bf16 GEMM here")
def test_row_split_weights_run_w8a32_at_few_rows_and_bf16_at_many():
    torch.manual_seed(0)
    weight = torch.randn(40, 32) * 0.1
    split = compact_linear("w8a32-bf16")(weight)
    fused = split.fused_with(torch.randn(8, 32) * 0.1, [torch.randn(40, 8) * 0.1])
    assert isinstance(split.few, PanelLinear) and isinstance(split.many, Bf16Linear)
    most = RowSplitLinear.MAX_FEW_ROWS
    for rows in (1, most, most + 1, 64):
        x, gate = torch.randn(rows, 32), torch.ones(rows, 1)
        chosen, other = (split.few, split.many) if rows <= most else (split.many, split.few)
        assert torch.equal(split(x), chosen(x))
        assert not torch.equal(split(x), other(x))  # the copies round differently
        chosen_fused = fused.few if rows <= most else fused.many
        assert torch.equal(fused(x, gate), chosen_fused(x, gate))


@pytest.mark.parametrize("weight_format", compact_formats())
def test_adapters_fused_into_the_compact_gemm_match_the_separate_update(
    drafter, hf_target, weight_format
):
    """Serving compact weights, each group's A is stacked under W in one GEMM: rows with the
    gate off are the compact projection itself, gated rows add the same low-rank update as the
    separate path up to the format's rounding of A."""
    config = hf_target.config
    view = compact_view(drafter.target, compact_linear(weight_format), config.hidden_size,
                        config.intermediate_size, range(1))
    adapters = drafter.lora[0]
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_B.normal_(std=0.05)
    gate = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])[:, None]
    for field, names in PROJECTION_GROUPS.values():
        base = getattr(view.layers[0], field)
        adapter = GroupAdapter.of(adapters, drafter.lora_shapes, names)
        fused = adapted_projection(base, adapter, drafter.scaling)
        if weight_format == "w8a32-bf16":
            assert isinstance(fused.few, PanelLoraLinear)
            assert isinstance(fused.many, LoraFusedLinear)
        else:
            panel_format = weight_format in ("fp16", "w8a32")
            assert isinstance(fused, PanelLoraLinear if panel_format else LoraFusedLinear)
        x = torch.randn(len(gate), adapter.lora_A.shape[1])
        with torch.no_grad():
            out, plain = fused(x, gate), base(x)
            separate = AdaptedProjection(base, adapter, drafter.scaling)(x, gate)
        off = gate[:, 0] == 0
        torch.testing.assert_close(out[off], plain[off], rtol=1e-6, atol=1e-6)
        update = (separate - plain)[~off]
        assert update.norm() > 0
        assert (out[~off] - separate[~off]).norm() < 0.05 * update.norm()


@pytest.mark.parametrize("weight_format", [None, *compact_formats()])
def test_served_dependency_head_tables_draft_as_its_layers(
    hf_target, target_dir, tmp_path, weight_format
):
    """Serving tabulates the head's maps of token embeddings (in bf16) and may run fc_hidden in
    the draft weights' format; its corrections and drafts match the head's own layers."""
    config = TargetIdentity.from_hf_config(hf_target.config)
    path = init_checkpoint(target_dir, tmp_path / "c", dependency_head=64, dependency_candidates=8)
    drafter = load_checkpoint(path, config).eval()
    drafter.bind_target(from_hf_llama(hf_target))
    head = drafter.dependency_head
    torch.manual_seed(0)
    with torch.no_grad():
        head.out.weight.normal_(std=0.2)
        head.fc_hidden.bias.normal_(std=0.5)
        hidden = torch.randn(16, 9, config.hidden_size)
        first = torch.randint(config.vocab_size, (16,))
        logits = drafter.logits(hidden)
        candidates = logits[:, 2].topk(8, dim=-1).indices
        own = head.maps(drafter.target.embed_tokens)
        exact = drafter.later_drafts(hidden[:, 2:], logits[:, 2:], first)
        drafter.prepare_for_serving(weight_format and compact_linear(weight_format))
        served = drafter.served_head
        assert served.previous.dtype == torch.bfloat16
        corrections = [
            maps.candidate_scores(
                candidates,
                F.silu(maps.fc_hidden(hidden[:, 2]) + maps.previous_part(first, hidden.dtype)),
            )
            for maps in (served, own)
        ]
        drafts = drafter.later_drafts(hidden[:, 2:], logits[:, 2:], first)
    # The corrections themselves, to bf16's and the format's rounding.
    assert (corrections[0] - corrections[1]).norm() < 0.05 * corrections[1].norm()
    # Rounding may flip a near tie between candidates, which then changes the rows after it.
    plain = logits[:, 2:].argmax(dim=-1)
    assert (drafts == exact).float().mean() >= 0.9
    assert (plain == exact).float().mean() < 0.5  # the head does re-rank


def test_served_rope_is_the_targets_own_op(drafter, hf_target):
    """Serving rotates q and k with the target's vLLM RoPE (in place on CPU); training computes
    cos/sin tables. Both give the same rotation (up to the float32 angles of vLLM's table)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    config = hf_target.config
    target = drafter.target
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(target.head_dim, max_position=config.max_position_embeddings,
                        rope_parameters=config.rope_parameters, dtype=torch.float32)
    positions = torch.tensor([[0, 7, 8, 9], [100, 101, 102, 103]])
    qkv = torch.randn(2, 4, target.num_heads + 2 * target.num_kv_heads, target.head_dim)
    with torch.no_grad():
        table = drafter._rope(positions, qkv.dtype)
        assert table.positions is None
        expected = table(qkv)
        # vLLM's CPU op (what the engine runs, in place) and its torch form (new tensors).
        for rotary in (rope.forward_cpu, rope.forward_native):
            drafter.bind_target(dataclasses.replace(target, rotary=rotary))
            served = drafter._rope(positions, qkv.dtype)
            assert served.positions is not None
            got = served(qkv.clone())
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            v = target.num_heads + target.num_kv_heads
            assert torch.equal(got[:, :, v:], qkv[:, :, v:])  # values untouched
        drafter.bind_target(target)
