"""Teacher completions generated with vLLM's offline batch engine (resumable)."""

import json
from pathlib import Path

from tqdm import tqdm

from vllm_ptp.data import read_jsonl
from vllm_ptp.engine import TESTBED_ENGINE_KWARGS
from vllm_ptp.train.data import COMPLETIONS_FILE

SAMPLED_TRANSFORM = {"temperature": 0.7, "top_p": 0.95, "top_k": 0}
GREEDY_TRANSFORM = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


def pregenerate(
    target: str,
    prompts_file: str,
    out_dir: str,
    samples_per_prompt: int = 1,
    greedy: bool = True,
    max_tokens: int = 256,
    limit: int | None = None,
    chunk_size: int = 64,
) -> Path:
    """Append completions for every prompt not yet in `out_dir`; returns the JSONL path."""
    from vllm import LLM, SamplingParams

    out_path = Path(out_dir) / COMPLETIONS_FILE
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out_path.exists():
        done = {json.loads(line)["prompt_id"] for line in out_path.open()}
    prompts = [p for p in read_jsonl(prompts_file)[:limit] if p["id"] not in done]
    if not prompts:
        return out_path
    transforms = [SAMPLED_TRANSFORM] * samples_per_prompt + ([GREEDY_TRANSFORM] if greedy else [])
    llm = LLM(model=target, **TESTBED_ENGINE_KWARGS)
    with out_path.open("a") as out, tqdm(total=len(prompts), desc="teacher completions") as bar:
        for start in range(0, len(prompts), chunk_size):
            chunk = prompts[start:start + chunk_size]
            chats = [[{"role": "user", "content": p["prompt"]}] for p in chunk]
            # Each transform runs as its own batch; a prompt is written only when all are done.
            results = [
                llm.chat(chats, SamplingParams(max_tokens=max_tokens, **t), use_tqdm=False)
                for t in transforms
            ]
            for i, prompt in enumerate(chunk):
                for j, (t, outputs) in enumerate(zip(transforms, results)):
                    row = {
                        "id": f"{prompt['id']}#{j}",
                        "prompt_id": prompt["id"],
                        "prompt_token_ids": list(outputs[i].prompt_token_ids),
                        "completion_token_ids": list(outputs[i].outputs[0].token_ids),
                        **t,
                    }
                    out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update(len(chunk))
    return out_path
