"""An independent autoregressive sampler on Hugging Face transformers with the same u(seed, pos).

It shares nothing with vLLM or the PTP drafter: plain HF forward passes, one token at a time,
each drawn as F^-1(u(seed, position)) under the request's transform.
"""

import torch

from vllm_ptp import rng, sampling
from vllm_ptp.sampling import SamplingRows


@torch.no_grad()
def hf_sample(model, prompt_ids: list[int], seed: int, max_tokens: int, temperature: float,
              top_p: float, eos_token_id: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    cache, output = None, []
    for _ in range(max_tokens):
        result = model(ids, past_key_values=cache, use_cache=True)
        cache = result.past_key_values
        position = len(prompt_ids) + len(output)
        rows = SamplingRows(
            temperature=torch.tensor([temperature]),
            top_k=torch.tensor([0]),
            top_p=torch.tensor([top_p]),
            min_p=torch.tensor([0.0]),
            u=rng.uniforms(torch.tensor([rng.normalize_seed(seed)]), torch.tensor([position])),
        )
        token = int(sampling.sample(result.logits[:, -1].float(), rows)[0])
        output.append(token)
        if token == eos_token_id:
            break
        ids = torch.tensor([[token]])
    return output
