"""Each compiled PTP op against its torch reference, with every CPU instruction set the machine
has (AVX-512, AVX2, scalar): median time per call, calls/s, the ratio, and the memory traffic the
op needs (bytes it must read and write once).

    flock /tmp/vllm-ptp-heavy.lock .venv/bin/python -m benchmarks.bench_ops [--name ops]

writes benchmarks/results/<name>.md and <name>.json. Timings mean something only on an idle
machine: the load average at the start is recorded with the results.
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_ptp import ops, rng, sampling
from vllm_ptp.models.gated_lora_llama import UEmbedding
from vllm_ptp.sampling import SamplingRows

RESULTS = Path(__file__).parent / "results"
VOCABS = (49152, 128256)  # SmolLM2 / Llama-3
ROWS = (1, 8, 16, 64)
K = 16  # drafts per request for the uniform and u-embedding ops
HIDDEN = 576  # SmolLM2-135M
HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, LORA_RANK = 9, 3, 64, 1536, 32  # SmolLM2-135M, shipped
BLOCK_SIZE, CONTEXT = 16, 2048
kernels = torch.ops.vllm_ptp


def median_seconds(fn: Callable[[], object], min_seconds: float, max_repeats: int = 200) -> float:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (
        time.perf_counter() - start < min_seconds and len(times) < max_repeats
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sampling_rows(num_rows: int, mode: str) -> SamplingRows:
    temperature = {"greedy": 0.0, "T=0.7": 0.7, "T=0.7 top-p 0.95": 0.7}[mode]
    top_p = 0.95 if "top-p" in mode else 1.0
    return SamplingRows(
        temperature=torch.full((num_rows,), temperature),
        top_k=torch.zeros(num_rows, dtype=torch.long),
        top_p=torch.full((num_rows,), top_p),
        min_p=torch.zeros(num_rows),
        u=torch.rand(num_rows),
    )


def verify_batch(num_rows: int, vocab: int, mode: str):
    """Requests of up to 8 rows (7 drafts + bonus) whose drafts are all accepted: every row is
    sampled, the fused kernel's worst case."""
    logits = torch.randn(num_rows, vocab) * 3
    rows = sampling_rows(num_rows, mode)
    per_request = min(num_rows, 8)
    num_drafts = torch.full((num_rows // per_request,), per_request - 1)
    tokens = sampling.sample(logits, rows).view(-1, per_request)
    return logits, rows, tokens[:, :-1].contiguous(), num_drafts


def cases(quick: bool):
    """(op, config, rows, vocab, reference, compiled, bytes per call)."""
    vocabs = VOCABS[:1] if quick else VOCABS
    for vocab in vocabs:
        for num_rows in ROWS:
            logits = torch.randn(num_rows, vocab) * 3
            logit_bytes = logits.numel() * 4 + num_rows * (5 * 4 + 8)
            for mode in ("greedy", "T=0.7", "T=0.7 top-p 0.95"):
                rows = sampling_rows(num_rows, mode)
                yield ("sample", mode, num_rows, vocab,
                       lambda lg=logits, r=rows: sampling.sample(lg, r),
                       lambda lg=logits, r=rows: ops.sample(lg, r),
                       logit_bytes)
            for mode in ("T=0.7", "T=0.7 top-p 0.95"):
                args = verify_batch(num_rows, vocab, mode)
                yield ("sample_and_verify", mode, num_rows, vocab,
                       lambda a=args: sampling.sample_and_verify(*a),
                       lambda a=args: ops.sample_and_verify(*a),
                       logit_bytes + args[2].numel() * 8 + args[3].numel() * 8 * 3)
    embedding = UEmbedding("interpolated", 16, HIDDEN)
    table = torch.randint(0, 4096, (64, CONTEXT // BLOCK_SIZE), dtype=torch.int32)
    for num_rows in (1, 8, 64):
        seeds = torch.randint(0, 2**62, (num_rows, 1))
        positions = torch.randint(0, 4096, (num_rows, 1)) + torch.arange(K)
        yield ("uniforms", f"{K} per row", num_rows, None,
               lambda s=seeds, p=positions: rng.uniforms(s, p),
               lambda s=seeds, p=positions: ops.uniforms(s, p),
               num_rows * K * (8 + 8 + 4))
        out = torch.zeros(num_rows, K + 1, HIDDEN)
        flat_seeds, start = seeds[:, 0], positions[:, 0]
        greedy = torch.zeros(num_rows, dtype=torch.bool)
        yield ("u_embedding", f"k={K}, hidden {HIDDEN}", num_rows, None,
               lambda o=out, s=flat_seeds, p=start, g=greedy:
                   ops.reference_write_u_embeddings(o, 1, embedding, s, p, g),
               lambda o=out, s=flat_seeds, p=start, g=greedy:
                   ops.write_u_embeddings(o, 1, embedding, s, p, g),
               num_rows * (K * HIDDEN * 4 * 3 + 17))
        index = torch.randperm(64)[:num_rows]
        zeros = torch.zeros(num_rows, dtype=torch.long)
        yield ("paged_slots", f"context {CONTEXT}, block {BLOCK_SIZE}", num_rows, None,
               lambda i=index, z=zeros:
                   ops.reference_paged_slots(table, i, z, CONTEXT, BLOCK_SIZE),
               lambda i=index, z=zeros: ops.paged_slots(table, i, z, CONTEXT, BLOCK_SIZE),
               num_rows * (CONTEXT // BLOCK_SIZE * 4 + CONTEXT * 8 + 16))
    yield from drafter_pass_cases()


def drafter_pass_cases():
    """The drafter-pass ops at SmolLM2's shapes, a pass of 1 + 8 rows per request."""
    q_len = 1 + 8
    for requests in (1, 8):
        for context in (128, 1024):
            blocks = requests * context // BLOCK_SIZE
            cache = torch.randn(blocks, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
            # As vLLM lays a request out: its blocks anywhere in the cache, positions in order
            # within each block.
            blocks_in_any_order = torch.randperm(blocks)[:, None] * BLOCK_SIZE
            slots = (blocks_in_any_order + torch.arange(BLOCK_SIZE)).view(requests, -1)
            lens = torch.full((requests,), context)
            qkv = torch.randn(requests, q_len, HEADS + 2 * KV_HEADS, HEAD_DIM)
            args = (qkv, HEADS, cache, slots, lens)
            yield ("paged_draft_attention", f"context {context}, 9 rows each", requests, None,
                   lambda a=args: ops.reference_paged_draft_attention(*a),
                   lambda a=args: ops.paged_draft_attention(*a),
                   requests * (2 * context * KV_HEADS * HEAD_DIM * 4 + qkv[0].numel() * 4))
    out_features = 2 * INTERMEDIATE  # gate_up, the widest group
    lora_Bs_t = [torch.randn(LORA_RANK, INTERMEDIATE) * 0.05 for _ in range(2)]
    columns, ranks = [0, INTERMEDIATE], [0, LORA_RANK]
    for requests in (1, 8):
        stacked = torch.randn(requests * q_len, out_features + 2 * LORA_RANK).bfloat16()
        gate = torch.ones(requests, q_len)
        gate[:, 0] = 0
        args = (stacked, gate.view(-1), lora_Bs_t, columns, ranks, out_features)
        yield ("gated_lora_expand", "gate_up, rank 32, bf16 GEMM output", requests * q_len, None,
               lambda a=args: ops.reference_gated_lora_expand(*a),
               lambda a=args: ops.gated_lora_expand(*a),
               stacked.numel() * 2 + 2 * LORA_RANK * INTERMEDIATE * 4
               + requests * q_len * out_features * 4)
    # gate_up with its two adapters as served: [W; A] in one int8 GEMM whose epilogue adds the
    # gated B update, against torch's float32 over W, A and B.
    weight = torch.randn(2 * INTERMEDIATE, HIDDEN) * 0.05
    lora_A = torch.randn(2 * LORA_RANK, HIDDEN) * 0.05
    lora_Bs = [torch.randn(INTERMEDIATE, LORA_RANK) * 0.05 for _ in range(2)]
    lora_B = torch.block_diag(*lora_Bs)
    packed, scales = ops.pack_panels(torch.cat((weight, lora_A)), torch.int8)
    lora = ops.LoraPanels.pack(lora_Bs)
    for requests in (1, 8):
        x = torch.randn(requests * q_len, HIDDEN)
        gate = torch.ones(requests, q_len, 1)
        gate[:, 0] = 0
        gate = gate.view(-1, 1)
        yield ("panel_linear + LoRA", "gate_up, int8, rank 32", len(x), None,
               lambda x=x, g=gate, w=weight: x @ w.T + ((x @ lora_A.T) * g) @ lora_B.T,
               lambda x=x, g=gate: ops.panel_linear(x, packed, scales, 2 * INTERMEDIATE, g, lora),
               packed.numel() + lora.blocks.numel() * 2 + x.numel() * 4
               + len(x) * 2 * INTERMEDIATE * 4)
    for name, out_features in (("gate_up", 2 * INTERMEDIATE), ("LM head", VOCABS[0])):
        weight = torch.randn(out_features, HIDDEN) * 0.05
        for dtype in (torch.float16, torch.int8):
            packed, scales = ops.pack_panels(weight, dtype)
            for requests in (1, 8):
                x = torch.randn(requests * q_len, HIDDEN)
                yield ("panel_linear", f"{name}, {dtype}".replace("torch.", ""), len(x), None,
                       lambda x=x, w=weight: x @ w.T,  # torch's float32 GEMM over W itself
                       lambda x=x, p=packed, s=scales, n=out_features: ops.panel_linear(x, p, s, n),
                       packed.numel() * packed.element_size() + x.numel() * 4
                       + len(x) * out_features * 4)


def run(quick: bool, min_seconds: float) -> dict:
    """Every case with the reference and the compiled op under each ISA; `compiled_us`, the
    speed-up and the rates are the widest ISA's (what serving uses)."""
    assert ops.compiled(), "build csrc/ first (pip install --no-build-isolation -e .)"
    isas, default_isa = ops.supported_cpu_isas(), kernels.cpu_isa()
    results = []
    with torch.inference_mode():
        for op, config, num_rows, vocab, reference, compiled, traffic in cases(quick):
            ref_s = median_seconds(reference, min_seconds)
            isa_s = {}
            for isa in isas:
                kernels.set_cpu_isa(isa)
                isa_s[isa] = median_seconds(compiled, min_seconds)
            kernels.set_cpu_isa(default_isa)
            ker_s = isa_s[isas[0]]
            results.append({
                "op": op, "config": config, "rows": num_rows, "vocab": vocab,
                "reference_us": ref_s * 1e6, "compiled_us": ker_s * 1e6,
                "compiled_us_by_isa": {isa: t * 1e6 for isa, t in isa_s.items()},
                "compiled_calls_per_s": 1 / ker_s, "reference_calls_per_s": 1 / ref_s,
                "speedup": ref_s / ker_s, "bytes_per_call": traffic,
                "compiled_gb_per_s": traffic / ker_s / 1e9,
            })
            by_isa = "  ".join(f"{isa} {t * 1e6:9.1f} us" for isa, t in isa_s.items())
            print(f"{op:18} {config:22} rows {num_rows:3} vocab {vocab or '-':>6}: "
                  f"ref {ref_s * 1e6:10.1f} us  {by_isa}  x{ref_s / ker_s:6.2f}", flush=True)
    return {
        "machine": {
            "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_isa": default_isa, "cpu_isas": isas, "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
        },
        "results": results,
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def markdown(report: dict) -> str:
    m = report["machine"]
    isas = m["cpu_isas"]
    lines = [
        "# PTP ops: compiled kernels vs torch references",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, CPU ISA "
        f"{m['cpu_isa']}, torch {m['torch']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}. Median of repeated "
        "calls. Traffic: bytes the op must read and write once (fp32 logits); GB/s = traffic / "
        f"compiled time, both for {isas[0]} (what serving uses). Without a SIMD ISA "
        "`paged_draft_attention` is its reference (gathered K/V, torch's attention). "
        "`sample_and_verify` rows: requests of 7 drafts + bonus, all accepted (every row "
        "sampled, the fused kernel's worst case).",
        "",
        "| op | config | rows | vocab | reference µs | "
        + " | ".join(f"{isa} µs" for isa in isas)
        + " | speed-up | compiled calls/s | traffic | GB/s |",
        "|---|---|---:|---:|---:|" + "---:|" * len(isas) + "---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        by_isa = " | ".join(f"{r['compiled_us_by_isa'][isa]:.1f}" for isa in isas)
        lines.append(
            f"| {r['op']} | {r['config']} | {r['rows']} | {r['vocab'] or '–'} "
            f"| {r['reference_us']:.1f} | {by_isa} | {r['speedup']:.2f}× "
            f"| {r['compiled_calls_per_s']:.0f} | {_bytes(r['bytes_per_call'])} "
            f"| {r['compiled_gb_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _bytes(n: int) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="vocab 49152 only, short timings")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing per case")
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--name", default="ops", help="results file name (.md and .json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = run(args.quick, 0.1 if args.quick else args.min_seconds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report))
    print(f"wrote {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
