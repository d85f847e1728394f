"""Training report: curves as PNG and a short markdown summary next to the checkpoint."""

from pathlib import Path

import torch


def _depth(draft_layers: int | None) -> str:
    return f"the target's top {draft_layers} layers" if draft_layers else "full depth"


def _u_embedding(cfg: dict) -> str:
    if cfg["u_embedding"] == "constant":  # u_embedding_size is unused: u is ignored
        return "constant (one vector for every request, greedy or sampled)"
    return f"{cfg['u_embedding']} ({cfg['u_embedding_size']} vectors)"


def write_report(out_dir: str | Path, history: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    steps = [r["step"] for r in history["steps"]]
    window = 25

    def smooth(values):
        return [sum(values[max(0, i - window):i + 1]) / len(values[max(0, i - window):i + 1])
                for i in range(len(values))]

    fig, (ax_loss, ax_tau) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, smooth([r["loss"] for r in history["steps"]]))
    ax_loss.set(xlabel="step", ylabel="cross-entropy (smoothed)", title="training loss")
    ax_tau.plot(steps, smooth([r["tau"] for r in history["steps"]]), label="train (smoothed)")
    val = history["validation"]
    ax_tau.plot([v["step"] for v in val], [v["tau"] for v in val], "o-", label="held-out")
    k = history["config"]["k"]
    ax_tau.set(xlabel="step", ylabel=f"teacher-forced tau @ k={k}", title="accepted length")
    ax_tau.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "training_curves.png", dpi=110)
    plt.close(fig)

    cfg = history["config"]
    last = val[-1] if val else {"tau": float("nan"), "per_position": []}
    lines = [
        "# Training report",
        "",
        f"- steps: {steps[-1] if steps else 0}, windows per step: {cfg['windows']} x k={k}, "
        f"training wall time: {history['steps'][-1]['seconds'] / 60:.1f} min "
        f"(torch threads: {torch.get_num_threads()})",
        f"- drafter: {_depth(cfg.get('draft_layers'))}, LoRA rank {cfg['lora_rank']}, "
        f"u-embedding {_u_embedding(cfg)}, lr {cfg['lr']}, dtype {cfg['dtype']}",
        *([f"- dependency head of width {cfg['dependency_head']}, re-ranking "
           f"{cfg['dependency_candidates']} candidates"
           + (" (trained alone; the rest of the drafter frozen)" if cfg["head_only"] else "")]
          if cfg.get("dependency_head") else []),
        *([f"- continued from the weights of {cfg['init_from']}"] if cfg.get("init_from") else []),
        f"- held-out teacher-forced tau @ k={k}: {last['tau']:.3f} (greedy sequences "
        f"{last.get('tau_greedy', float('nan')):.3f}, sampled T=0.7/top-p 0.95 "
        f"{last.get('tau_sampled', float('nan')):.3f})",
        "- held-out acceptance by position: "
        + " ".join(f"{a:.2f}" for a in last["per_position"]),
        "",
        "![curves](training_curves.png)",
    ]
    path = out_dir / "training_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
