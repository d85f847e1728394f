"""Spec-Bench results: summary numbers, the markdown table, the PNG plots, the machine."""

import json
import os
import platform
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Any

SUMMED = ("seconds", "tokens", "num_drafts", "num_draft_tokens", "num_accepted_tokens",
          "num_lookup_drafts", "prefill_seconds", "decode_seconds", "decode_tokens")


def _totals(runs: list[dict]) -> dict[str, Any]:
    # Runs recorded before a field existed count as 0 for it (unmeasured).
    total = {key: sum(r.get(key, 0) for r in runs) for key in SUMMED}
    width = max((len(r["accepted_per_position"]) for r in runs), default=0)
    total["accepted_per_position"] = [
        sum(r["accepted_per_position"][i] for r in runs if i < len(r["accepted_per_position"]))
        for i in range(width)
    ]
    total["drafter_pass_seconds"] = [t for r in runs for t in r["drafter_pass_seconds"]]
    total["verify_pass_seconds"] = [t for r in runs for t in r["verify_pass_seconds"]]
    total["acceptance_thresholds"] = [r["acceptance_threshold"] for r in runs
                                      if r.get("acceptance_threshold") is not None]
    return total


def _tau(tokens, accepted):
    """Generated tokens per verification step (numbers or numpy arrays)."""
    return tokens / (tokens - accepted)


def _measures(total: dict[str, Any]) -> dict[str, Any]:
    tokens, accepted = total["tokens"], total["num_accepted_tokens"]
    drafter, verify = total["drafter_pass_seconds"], total["verify_pass_seconds"]
    decoding = total["decode_seconds"]
    return {
        # Spec-Bench's tau: generated tokens per target verification step (each step emits its
        # accepted drafts plus one token of the target's own).
        "tau": _tau(tokens, accepted) if tokens > accepted else 1.0,
        "tokens_per_second": tokens / total["seconds"] if total["seconds"] else 0.0,
        "tokens": tokens,
        "seconds": total["seconds"],
        # After each request's first token: the rate speculation can change. The prompt's
        # prefill is the same work with or without a speculator. Both are sums over requests,
        # of each request's own time: concurrent requests' times overlap, so the prefill share
        # is of the requests' time (at batch 1, about the wall time) and the decode rate is a
        # request's own rate (at batch 1, the throughput).
        "decode_tokens_per_second": total["decode_tokens"] / decoding if decoding else None,
        "prefill_share": total["prefill_seconds"] / (total["prefill_seconds"] + decoding)
        if decoding else None,
        "acceptance_by_position": [n / total["num_drafts"] for n in total["accepted_per_position"]]
        if total["num_drafts"] else [],
        "drafts_per_step": total["num_draft_tokens"] / total["num_drafts"]
        if total["num_drafts"] else None,
        # Share of PTP's drafting steps whose later drafts (all, in copy runs) came from lookup.
        "lookup_share": total["num_lookup_drafts"] / total["num_drafts"]
        if total["num_drafts"] else None,
        # PTP's drafter passes per drafting step: below 1 where copy runs skipped the pass.
        "drafter_passes_per_step": len(drafter) / total["num_drafts"]
        if drafter and total["num_drafts"] else None,
        # PTP's draft-length threshold, median over the chunks (each: after the chunk).
        "acceptance_threshold": median(total["acceptance_thresholds"])
        if total["acceptance_thresholds"] else None,
        "drafter_pass_ms": 1000 * median(drafter) if drafter else None,
        "verify_pass_ms": 1000 * median(verify) if verify else None,
    }


MIN_PAIRED_RUNS = 5  # fewer question runs give no bootstrap interval worth printing
BOOTSTRAP_SAMPLES = 2000


def paired_tau_gap(runs: list[dict], other: list[dict]) -> dict[str, Any] | None:
    """τ of `runs` minus τ of `other` over the question runs both have, with a 95% bootstrap
    interval: questions resampled with replacement, each pair kept together. Greedy τ of one
    question is deterministic, so the interval is how much the gap depends on which questions
    were asked. None with fewer than MIN_PAIRED_RUNS pairs."""
    import numpy as np

    theirs = {tuple(r["question_ids"]): r for r in other}
    pairs = [(r, theirs[key]) for r in runs if (key := tuple(r["question_ids"])) in theirs]
    if len(pairs) < MIN_PAIRED_RUNS:
        return None
    counts = np.array([[[r["tokens"], r["num_accepted_tokens"]] for r in pair] for pair in pairs],
                      dtype=float)  # [pairs, 2 speculators, (tokens, accepted)]
    picks = np.random.default_rng(0).integers(len(pairs), size=(BOOTSTRAP_SAMPLES, len(pairs)))
    sums = counts[picks].sum(axis=1)  # [samples, 2, 2]
    gaps = _tau(sums[:, 0, 0], sums[:, 0, 1]) - _tau(sums[:, 1, 0], sums[:, 1, 1])
    total = counts.sum(axis=0)
    low, high = np.percentile(gaps, [2.5, 97.5])
    return {"gap": float(_tau(*total[0]) - _tau(*total[1])), "low": float(low),
            "high": float(high), "pairs": len(pairs)}


def ablation_of(spec: str, names: list[str]) -> str | None:
    """The u-ignoring ablation run beside PTP speculator `spec` (same k and options)."""
    kind, _, rest = spec.partition("-")
    ablation = f"independent-{rest}"
    return ablation if kind == "ptp" and ablation in names else None


def summarize(raw: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{mode: {speculator: measures + speed-up + per_category}}; speed-ups are against the
    first speculator (no speculation) of the same mode and category."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in raw["runs"]:
        groups[(run["mode"], run["speculator"])].append(run)
    reference = raw["settings"]["speculators"][0]["name"]
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in raw["settings"]["modes"]:
        summary[mode] = {}
        for spec in (s["name"] for s in raw["settings"]["speculators"]):
            runs = groups[(mode, spec)]
            result = _measures(_totals(runs))
            by_category: dict[str, list[dict]] = defaultdict(list)
            for run in runs:
                by_category[run["category"]].append(run)
            # In the question file's order: the runs come in the order the start-ups ran them.
            result["per_category"] = {c: _measures(_totals(by_category[c]))
                                      for c in raw["settings"]["categories"]}
            # The same target work in each engine process: how much the process moved it.
            result["verify_pass_ms_by_engine_start"] = [
                _measures(_totals([r for r in runs if r["engine_start"] == i]))["verify_pass_ms"]
                for i in range(raw["settings"]["engine_starts"])
            ]
            summary[mode][spec] = result
        names = list(summary[mode])
        for spec in names:
            if ablation := ablation_of(spec, names):
                theirs = groups[(mode, ablation)]
                summary[mode][spec]["tau_gap_to_ablation"] = {
                    "ablation": ablation,
                    "all": paired_tau_gap(groups[(mode, spec)], theirs),
                    "per_category": {
                        c: paired_tau_gap([r for r in groups[(mode, spec)] if r["category"] == c],
                                          [r for r in theirs if r["category"] == c])
                        for c in summary[mode][spec]["per_category"]
                    },
                }
        base = summary[mode][reference]
        for result in summary[mode].values():
            _add_speedups(result, base)
            for category, measures in result["per_category"].items():
                _add_speedups(measures, base["per_category"][category])
    return summary


def _add_speedups(measures: dict[str, Any], base: dict[str, Any]) -> None:
    measures["speedup"] = measures["tokens_per_second"] / base["tokens_per_second"]
    ours, theirs = measures["decode_tokens_per_second"], base["decode_tokens_per_second"]
    measures["decode_speedup"] = ours / theirs if ours and theirs else None


def machine() -> dict[str, Any]:
    import torch
    import vllm

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "platform": platform.platform(),
    }


def _differences(check: dict[str, Any]) -> str:
    """Where the differing turns first differ (runs before this field have none)."""
    if not check.get("differences"):
        return ""
    return " (first different token: " + ", ".join(
        f"question {d['question_id']} turn {d['turn'] + 1} token {d['token']}"
        for d in check["differences"]
    ) + ")"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _draft_length_note(settings: dict[str, Any]) -> str:
    threshold = settings.get("ptp_min_acceptance")
    if not threshold:
        return ""
    raised = (", or more where the passes' rows cost more than a position returns "
              "(VLLM_PTP_DRAFT_COSTS; the table's threshold column)"
              if settings.get("ptp_draft_costs") else "")
    return (f". PTP proposes up to k drafts: the positions whose running acceptance is at least "
            f"{threshold} (VLLM_PTP_MIN_ACCEPTANCE){raised}, plus one probe")


def own_settings_note(settings: dict[str, Any]) -> str:
    own = [f"{sp['name']} with " + ", ".join(f"{k}={v}" for k, v in own_settings.items())
           for sp in settings["speculators"]
           if (own_settings := {**sp.get("environment", {}), **sp.get("engine", {})})]
    return f". Engines started with their own settings: {'; '.join(own)}" if own else ""


def _engine_start_lines(settings: dict[str, Any], summary: dict) -> list[str]:
    if settings["engine_starts"] < 2:
        return []
    lines = ["", f"The engines were started {settings['engine_starts']} times, every other time "
             "in reverse order, and the chunks dealt out over the start-ups in turn. Median "
             "verification pass (ms) per start-up:", ""]
    for mode, results in summary.items():
        cells = [f"{spec} " + " / ".join(_fmt(ms, 1) for ms in r["verify_pass_ms_by_engine_start"])
                 for spec, r in results.items() if r["verify_pass_ms"] is not None]
        lines.append(f"- {mode}: " + "; ".join(cells))
    return lines


def _gap_cell(gap: dict[str, Any] | None) -> str:
    if gap is None:
        return "–"
    verdict = "higher" if gap["low"] > 0 else "lower" if gap["high"] < 0 else "level"
    return f"{gap['gap']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}] {verdict}"


def _ablation_lines(mode: str, results: dict[str, dict[str, Any]]) -> list[str]:
    """PTP's τ minus the ablation's, per category, with its 95% interval over questions."""
    lines = []
    for spec, r in results.items():
        if not (gaps := r.get("tau_gap_to_ablation")):
            continue
        categories = list(gaps["per_category"])
        lines += ["", f"{mode}: τ of {spec} minus τ of {gaps['ablation']}, 95% bootstrap "
                  "interval over the questions (higher / lower: the interval excludes 0; –: "
                  f"fewer than {MIN_PAIRED_RUNS} question runs)", "",
                  "| all | " + " | ".join(categories) + " |",
                  "| --- |" + " --- |" * len(categories),
                  "| " + " | ".join(_gap_cell(g) for g in
                                    [gaps["all"], *gaps["per_category"].values()]) + " |"]
    return lines


def markdown(raw: dict[str, Any], summary: dict) -> str:
    s = raw["settings"]
    m = raw["machine"]
    lines = [
        "# Spec-Bench on the CPU testbed",
        "",
        f"Command: `{raw['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}, "
        f"vLLM {m['vllm']}. {s['num_questions']} questions, up to {s['max_tokens']} new tokens "
        f"per turn; sampled = temperature {s['sampled']['temperature']}, top-p "
        f"{s['sampled']['top_p']}, fixed seeds. Engines: "
        + ", ".join(f"{k}={v}" for k, v in s["engine"].items())
        + "".join(f"; {k}={v}" for k, v in s.get("cpu_environment", {}).items())
        + _draft_length_note(s)
        + own_settings_note(s)
        + f". Engine start-up {raw['startup_seconds']:.0f} s"
        + (f" ({s['engine_starts']} start-ups)" if s["engine_starts"] > 1 else "")
        + ", whole run "
        f"{raw['bench_seconds'] / 60:.1f} min. One run; speed-ups are ratios of rates measured "
        "in the same run, interleaved chunk by chunk.",
        "",
        "| mode | speculator | τ | drafts/step | threshold | lookup steps | drafter passes/step | "
        "tok/s | speed-up | prefill share | decode speed-up | drafter pass ms | verify pass ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    coupled = {sp["name"] for sp in s["speculators"] if sp.get("coupled")}  # PTP family
    for mode, results in summary.items():
        for spec, r in results.items():
            lookup_share = r.get("lookup_share") if spec in coupled else None
            lines.append(
                f"| {mode} | {spec} | {r['tau']:.2f} | {_fmt(r.get('drafts_per_step'), 2)} | "
                f"{_fmt(r.get('acceptance_threshold'), 2)} | {_fmt(lookup_share, 2)} | "
                f"{_fmt(r.get('drafter_passes_per_step'), 2)} | {r['tokens_per_second']:.1f} | "
                f"{r['speedup']:.2f}× | {_fmt(r['prefill_share'], 2)} | "
                f"{_fmt(r['decode_speedup'], 2)}{'×' if r['decode_speedup'] else ''} | "
                f"{_fmt(r['drafter_pass_ms'], 1)} | "
                f"{_fmt(r['verify_pass_ms'], 1)} |"
            )
    lines += ["", "Prefill share: the part of each request's time from its scheduling to its "
              "first token (vLLM's own request timestamps). Decode speed-up: the ratio of the "
              "decoding rates, each request's tokens after its first over its time from first "
              "to last token; the prompts' prefill, which no speculator shortens, is left out. "
              "At batch 1 these are shares and rates of the wall time; with concurrent "
              "requests, of each request's own time (a request's decoding speed)."]
    lines += _engine_start_lines(s, summary)
    lines += ["", "Output checks:", ""]
    lines += [f"- {c['mode']}, {c['speculator']}: {c['identical']}/{c['total']} outputs "
              f"{c['check']}" + _differences(c) for c in raw["checks"]]
    for mode, results in summary.items():
        categories = list(next(iter(results.values()))["per_category"])
        lines += ["", f"## {mode}: τ / speed-up per category", "",
                  "| speculator | " + " | ".join(categories) + " |",
                  "| --- |" + " --- |" * len(categories)]
        for spec, r in results.items():
            cells = [f"{r['per_category'][c]['tau']:.2f} / {r['per_category'][c]['speedup']:.2f}×"
                     for c in categories]
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
        lines += _ablation_lines(mode, results)
        lines += ["", f"{mode}: acceptance by draft position", ""]
        for spec, r in results.items():
            if r["acceptance_by_position"]:
                lines.append(f"- {spec}: " + " ".join(f"{a:.2f}"
                                                     for a in r["acceptance_by_position"]))
    lines += ["", "![tau per category](tau_per_category.png)", "",
              "![speed-up](speedup.png)", "", "![acceptance by position](acceptance.png)", ""]
    return "\n".join(lines)


def plots(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(summary)
    specs = list(summary[modes[0]])

    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        categories = list(summary[mode][specs[0]]["per_category"])
        x = np.arange(len(categories))
        width = 0.8 / len(specs)
        for i, spec in enumerate(specs):
            taus = [summary[mode][spec]["per_category"][c]["tau"] for c in categories]
            ax.bar(x + i * width, taus, width, label=spec)
        ax.set_xticks(x + 0.4 - width / 2, categories, rotation=20, fontsize=8)
        ax.set_ylabel("τ (tokens / step)")
        ax.set_title(mode)
    axes[0, 0].legend(fontsize=8, ncol=len(specs))
    fig.tight_layout()
    fig.savefig(out / "tau_per_category.png", dpi=110)
    plt.close(fig)

    # Whole turns, and their decoding alone: the gap between the two is the prompts' prefill.
    panels = [("speedup", "whole turns")]
    if all(summary[m][spec]["decode_speedup"] for m in modes for spec in specs):
        panels.append(("decode_speedup", "decoding (after each request's first token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False,
                             sharey=True)
    x = np.arange(len(modes))
    width = 0.8 / len(specs)
    for ax, (key, title) in zip(axes[0], panels):
        for i, spec in enumerate(specs):
            ax.bar(x + i * width, [summary[m][spec][key] for m in modes], width, label=spec)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x + 0.4 - width / 2, modes)
        ax.set_title(title)
    axes[0, 0].set_ylabel("speed-up vs no speculation")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for spec in specs:
            acceptance = summary[mode][spec]["acceptance_by_position"]
            if acceptance:
                ax.plot(range(1, len(acceptance) + 1), acceptance, marker="o", label=spec)
        ax.set_title(mode)
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("acceptance rate")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=110)
    plt.close(fig)


def write_results(raw: dict[str, Any], out: str | Path, command: str) -> Path:
    """Write results.json (every raw number), README.md (tables) and the plots into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = {"command": command, "machine": machine(), **raw}
    summary = summarize(raw)
    (out / "results.json").write_text(json.dumps({**raw, "summary": summary}, indent=1))
    (out / "README.md").write_text(markdown(raw, summary))
    plots(summary, out)
    return out / "README.md"
