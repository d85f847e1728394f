"""Distillation of a PTP drafter (and teacher-free training: same loop, raw-text sequences).

Per step, the target (adapters off) runs once over a sequence, giving the context K/V and every
next-token distribution. W windows of k tokens start at random completion positions; window
token x_{s+j} gets u drawn inside its CDF interval under the target (greedy sequences get the
greedy marker). Each window is laid out as vLLM's proposer lays out a request: its newest token
x_{s-1} and k auxiliary rows, attending to the context before s - 1 and to their own window;
the auxiliary rows learn to output x_{s+j} from those u's (cross-entropy), and so does a shallow
drafter's newest-token row for x_s, its first draft. Randomness is a function of (seed, step),
so a resumed run is identical to an uninterrupted one.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_ptp.checkpoint import build_drafter, load_checkpoint, save_checkpoint
from vllm_ptp.config import PTPCheckpointError, PTPConfig, TargetIdentity
from vllm_ptp.models.gated_lora_llama import GatedLoraDrafter, KVContext, draft_query
from vllm_ptp.models.target import from_hf_llama
from vllm_ptp.rng import GREEDY_U
from vllm_ptp.sampling import GREEDY_TEMPERATURE, SamplingRows, sample
from vllm_ptp.train.data import Sequence
from vllm_ptp.train.intervals import cdf_intervals, draw_inside

IGNORE = -100
STATE_FILE = "train_state.pt"
INIT_SEQUENCES = 48  # sequences that set the drafter's starting inputs (`_init_inputs`)
# Ridge strength of the token-row fit, relative to the mean squared input. On the testbed (48
# sequences, top 8 layers) the fit's held-out error is 0.60 of the hidden state's norm, against
# 0.69 for the mean alone; 8 sequences under a 100x weaker ridge overfit (1.19).
INIT_RIDGE = 0.1


@dataclass
class TrainConfig:
    steps: int = 1000
    k: int = 8
    windows: int = 32  # windows per sequence and step
    lr: float = 5e-4
    warmup: int = 50
    grad_accum: int = 1
    lora_rank: int = 16
    lora_alpha: float = 32.0
    draft_layers: int | None = None  # the target's top layers the drafter runs (None: all)
    u_embedding: str = "interpolated"
    u_embedding_size: int = 16
    max_len: int = 640
    z_beta: float = 0.3  # z ~ Beta(a, a) inside the interval (mass near the edges, as the paper)
    val_every: int = 100
    save_every: int = 50
    val_sequences: int = 24
    seed: int = 0
    dtype: str = "float32"
    stop_at: int | None = None  # end this run early at that step (resume later to continue)
    init_from: str | None = None  # start from this checkpoint's weights (same drafter shape)
    dependency_head: int | None = None  # width of the dependency head (None: no head)
    dependency_candidates: int = 8
    head_only: bool = False  # train only the dependency head; the rest stays as init_from left it


@dataclass
class WindowBatch:
    token_ids: torch.Tensor  # [length] the sequence
    starts: torch.Tensor  # [W] first token index of each window
    labels: torch.Tensor  # [W, k] tokens to predict (IGNORE past the sequence end)
    u: torch.Tensor  # [W, k] auxiliary inputs (GREEDY_U for greedy sequences)


def make_windows(
    seq: Sequence, logits: torch.Tensor, windows: int, k: int, gen: torch.Generator, beta: float
) -> WindowBatch:
    ids = torch.tensor(seq.token_ids)
    length = len(ids)
    starts = torch.randint(seq.completion_start, length, (windows,), generator=gen)
    index = starts[:, None] + torch.arange(k)
    valid = index < length
    safe = index.clamp(max=length - 1)
    labels = torch.where(valid, ids[safe], IGNORE)
    if seq.temperature < GREEDY_TEMPERATURE:
        return WindowBatch(ids, starts, labels, torch.full(labels.shape, GREEDY_U))
    flat = safe.flatten()
    # Windows overlap: each token's interval is computed once (the transform sorts the vocab).
    positions, index_of = flat.unique(return_inverse=True)
    rows = _transform_rows(seq, torch.zeros(positions.shape))
    # The distribution of token t is the target's output at position t - 1.
    left, right = cdf_intervals(logits[positions - 1], ids[positions], rows)
    left, right = left[index_of], right[index_of]
    z = torch.distributions.Beta(beta, beta).sample(flat.shape) if beta > 0 else torch.rand(
        flat.shape, generator=gen
    )
    return WindowBatch(ids, starts, labels, draw_inside(left, right, z).view(labels.shape))


def drafter_pass(
    drafter: GatedLoraDrafter, teacher: "TeacherPass", batch: WindowBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows in one pass, laid out as vLLM's proposer lays out requests (`draft_query`):
    window w is a sequence whose newest token is x_{s_w - 1}, with the context before it.
    Returns the final hidden states and logits of the rows, [W, 1 + k, hidden / vocab]: the
    newest token's row, then the k auxiliary rows."""
    target = drafter.target
    context_len = teacher.cache.layers[0].keys.shape[2]
    position = batch.starts - 1
    token_row = drafter.token_row(
        target.embed_tokens(batch.token_ids[position]), teacher.hidden[position - 1]
    )
    inputs_embeds = torch.cat((token_row[:, None], drafter.u_embedding(batch.u)), dim=1)
    query = draft_query(inputs_embeds, position, context_len, drafter.adapts_token_row)
    windows = len(position)

    def context(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = teacher.cache.layers[layer]
        return kv.keys.expand(windows, -1, -1, -1), kv.values.expand(windows, -1, -1, -1)

    hidden = drafter(query, KVContext(context, target.num_heads))
    return hidden, drafter.logits(hidden)


def draft_loss(
    drafter: GatedLoraDrafter, hidden: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the rows the drafter trains: auxiliary row j learns x_{s+j}, and a
    shallow drafter's newest-token row learns x_s, the first draft it serves (at full depth
    that row is the target itself). A dependency head learns rows 2..k given the true token
    before each (teacher forcing: while drafts are accepted, they are those tokens)."""
    rows, targets = logits[:, 1:], labels
    if drafter.adapts_token_row:
        rows = torch.cat((logits[:, :1], rows), dim=1)
        targets = torch.cat((labels[:, :1], labels), dim=1)
    loss = F.cross_entropy(rows.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    if drafter.dependency_head is not None:
        # A previous token past the sequence end has an ignored label after it.
        dependent = drafter.dependent_logits(
            hidden[:, 2:], logits[:, 2:], labels[:, :-1].clamp(min=0)
        )
        loss = loss + F.cross_entropy(
            dependent.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE
        )
    return loss


def served_drafts(
    drafter: GatedLoraDrafter, seq: Sequence, hidden: torch.Tensor, logits: torch.Tensor,
    batch: WindowBatch,
) -> torch.Tensor:
    """The k drafts per window as vLLM's proposer makes them (`PTPProposer._draft_tokens`):
    the first is F^-1(u) under the newest token's row, the others `later_drafts` of auxiliary
    rows 2..k. hidden, logits: from `drafter_pass`."""
    u = batch.u[:, 0].clamp(min=0.0)  # greedy rows (GREEDY_U) take the argmax anyway
    first = sample(logits[:, 0].float(), _transform_rows(seq, u))
    later = drafter.later_drafts(hidden[:, 2:], logits[:, 2:], first)
    return torch.cat((first[:, None], later), dim=1)


def accepted_lengths(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced accepted length per window: 1 + leading correct drafts."""
    correct = (predicted == labels) & (labels != IGNORE)
    return 1 + correct.long().cumprod(dim=1).sum(dim=1)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class TeacherPass:
    """The target's pass over one sequence (adapters off)."""

    logits: torch.Tensor  # [length, vocab] float32
    hidden: torch.Tensor  # [length, hidden] final (normed) hidden states
    cache: object  # transformers cache: context K/V per layer
    layer_inputs: tuple[torch.Tensor, ...]  # hidden state entering each layer, [1, length, hidden]


@torch.no_grad()
def teacher_pass(model, seq: Sequence) -> TeacherPass:
    out = model(torch.tensor([seq.token_ids]), use_cache=True, output_hidden_states=True)
    return TeacherPass(
        out.logits[0].float(), out.hidden_states[-1][0], out.past_key_values, out.hidden_states
    )


def evaluate(
    drafter: GatedLoraDrafter, model, sequences: list[Sequence], k: int, windows: int, seed: int
) -> dict:
    """Teacher-forced expected accepted length (tau) and per-position acceptance at k, over all
    sequences and separately for greedy and sampled ones, with the drafts made as vLLM's
    proposer makes them."""
    drafter.eval()
    lengths: dict[str, list[torch.Tensor]] = {"greedy": [], "sampled": []}
    correct_prefix = []
    with torch.no_grad():
        for i, seq in enumerate(sequences):
            gen = step_generator(seed, i)
            teacher = teacher_pass(model, seq)
            batch = make_windows(seq, teacher.logits, windows, k, gen, beta=0.0)
            hidden, logits = drafter_pass(drafter, teacher, batch)
            predicted = served_drafts(drafter, seq, hidden, logits, batch)
            kind = "greedy" if seq.temperature < GREEDY_TEMPERATURE else "sampled"
            lengths[kind].append(accepted_lengths(predicted, batch.labels).float())
            correct = (predicted == batch.labels) & (batch.labels != IGNORE)
            correct_prefix.append(correct.long().cumprod(dim=1).float())
    drafter.train()
    result = {
        "tau": float(torch.cat(lengths["greedy"] + lengths["sampled"]).mean()),
        "per_position": torch.cat(correct_prefix).mean(0).tolist(),
    }
    for kind, values in lengths.items():
        if values:
            result[f"tau_{kind}"] = float(torch.cat(values).mean())
    return result


def _transform_rows(seq: Sequence, u: torch.Tensor) -> SamplingRows:
    """Rows of the transform `seq` was sampled under, one per entry of u."""
    return SamplingRows(
        temperature=torch.full(u.shape, seq.temperature),
        top_k=torch.full(u.shape, seq.top_k),
        top_p=torch.full(u.shape, seq.top_p),
        min_p=torch.zeros(u.shape),
        u=u,
    )


def new_ptp_config(target_model, target_name: str, cfg: TrainConfig) -> PTPConfig:
    return PTPConfig(
        target=TargetIdentity.from_hf_config(target_model.config),
        target_name_or_path=target_name,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        u_embedding=cfg.u_embedding,
        u_embedding_size=cfg.u_embedding_size,
        max_k=max(16, cfg.k),
        default_k=cfg.k,
        num_draft_layers=cfg.draft_layers,
        dependency_head=cfg.dependency_head,
        dependency_candidates=cfg.dependency_candidates,
    )


def _init_inputs(drafter: GatedLoraDrafter, model, sequences: list[Sequence]) -> None:
    """Start the drafter's inputs in distribution for the target layer they enter (the token
    embeddings at full depth): early steps then learn the task rather than undo an arbitrary
    input scale. The u vectors start near the mean hidden state there; a shallow drafter's
    token-row map starts as the least-squares fit of the newest token's true hidden state there
    from what the row gets instead (ridge regression over a few sequences' completions)."""
    first = drafter.first_layer
    inputs, wanted = [], []
    with torch.no_grad():
        for seq in sequences:
            teacher = teacher_pass(model, seq)
            # Position 0 is left out: deep layers give the first token outsized activations.
            position = torch.arange(max(seq.completion_start, 2), len(seq.token_ids))
            embeds = drafter.target.embed_tokens(torch.tensor(seq.token_ids)[position])
            inputs.append(torch.cat((embeds, teacher.hidden[position - 1]), dim=-1))
            wanted.append(teacher.layer_inputs[first][0, position])
        wanted = torch.cat(wanted)
        mean = wanted.mean(0)
        embedding = drafter.u_embedding
        embedding.weight.copy_(mean + 0.1 * mean.std() * torch.randn_like(embedding.weight))
        if embedding.greedy is not None:
            embedding.greedy.copy_(mean + 0.1 * mean.std() * torch.randn_like(mean))
        if drafter.token_row_fc is not None:
            x = torch.cat(inputs).double()
            ridge = INIT_RIDGE * x.square().sum(0).mean()
            gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
            fit = torch.linalg.solve(gram, x.T @ wanted.double())  # [2 * hidden, hidden]
            drafter.token_row_fc.weight.copy_(fit.T)


def init_from_checkpoint(drafter: GatedLoraDrafter, path: str, model) -> None:
    """Continue training a checkpoint (e.g. on more data): its weights, fresh optimizer. A
    dependency head the checkpoint lacks starts fresh (as no head)."""
    source = load_checkpoint(path, TargetIdentity.from_hf_config(model.config))
    mine, theirs = drafter.expected_weight_shapes(), source.expected_weight_shapes()
    new_head = {name for name in mine if name.startswith("dependency_head.")} - set(theirs)
    if {name: shape for name, shape in mine.items() if name not in new_head} != theirs:
        raise PTPCheckpointError(
            f"--init-from {path}: its drafter has other weights than this run's (LoRA rank, "
            "modules, u-embedding, depth or dependency head differ). Pass the same settings it "
            "was trained with."
        )
    drafter.load_state_dict(source.state_dict(), strict=not new_head)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model,
    target_name: str,
    train_sequences: list[Sequence],
    val_sequences: list[Sequence],
    out_dir: str | Path,
    cfg: TrainConfig,
    training_sampling: dict | None = None,
) -> dict:
    """Train (or resume) a drafter into `out_dir`; returns the history."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    drafter = build_drafter(new_ptp_config(model, target_name, cfg))
    drafter.config.training_sampling = training_sampling
    drafter.bind_target(from_hf_llama(model))
    if cfg.init_from:
        init_from_checkpoint(drafter, cfg.init_from, model)
    else:
        _init_inputs(drafter, model, train_sequences[:INIT_SEQUENCES])
    if cfg.head_only and drafter.dependency_head is None:
        raise ValueError("head_only needs a dependency head (--dependency-head WIDTH)")
    trained = drafter.dependency_head if cfg.head_only else drafter
    optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    history = {"config": asdict(cfg), "steps": [], "validation": []}
    state_path = out_dir / STATE_FILE
    start = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        drafter.load_state_dict(state["drafter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["step"]
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    drafter.train()
    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="PTP distillation")
    elapsed = history["steps"][-1]["seconds"] if history["steps"] else 0.0
    for step in bar:
        step_start = time.perf_counter()
        gen = step_generator(cfg.seed, step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # Beta draws
        loss_sum, taus = 0.0, []
        for _ in range(cfg.grad_accum):
            seq = train_sequences[int(torch.randint(len(train_sequences), (1,), generator=gen))]
            teacher = teacher_pass(model, seq)
            batch = make_windows(seq, teacher.logits, cfg.windows, cfg.k, gen, cfg.z_beta)
            # Head-only: the pass itself needs no gradients (the head runs after it).
            with autocast, torch.set_grad_enabled(not cfg.head_only):
                hidden, logits = drafter_pass(drafter, teacher, batch)
            loss = draft_loss(drafter, hidden, logits, batch.labels)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            with torch.no_grad():
                drafts = served_drafts(drafter, seq, hidden, logits, batch)
            taus.append(float(accepted_lengths(drafts, batch.labels).float().mean()))
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - step_start
        history["steps"].append(
            {"step": step + 1, "loss": loss_sum, "tau": sum(taus) / len(taus), "seconds": elapsed}
        )
        recent = history["steps"][-50:]
        bar.set_postfix(
            loss=f"{sum(r['loss'] for r in recent) / len(recent):.3f}",
            tau=f"{sum(r['tau'] for r in recent) / len(recent):.2f}",
        )
        done = step + 1 == end
        if (step + 1) % cfg.val_every == 0 or done:
            result = evaluate(drafter, model, val_sequences[: cfg.val_sequences], cfg.k, 16,
                              cfg.seed)
            history["validation"].append({"step": step + 1, **result})
            bar.write(
                f"step {step + 1}: held-out tau@{cfg.k} = {result['tau']:.3f} (greedy "
                f"{result.get('tau_greedy', float('nan')):.3f}, sampled "
                f"{result.get('tau_sampled', float('nan')):.3f})"
            )
        if (step + 1) % cfg.save_every == 0 or done:
            _save(drafter, optimizer, scheduler, history, step + 1, out_dir)
    return history


def _save(drafter, optimizer, scheduler, history, step, out_dir: Path) -> None:
    drafter.config.extra = {"trained_steps": step, "train_config": history["config"]}
    save_checkpoint(drafter, out_dir)
    state = {
        "drafter": drafter.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
        "step": step,
    }
    torch.save(state, out_dir / (STATE_FILE + ".tmp"))
    (out_dir / (STATE_FILE + ".tmp")).replace(out_dir / STATE_FILE)
    (out_dir / "history.json").write_text(json.dumps(history))
