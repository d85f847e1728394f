"""Turning a Hugging Face causal LM into a PTP checkpoint: teacher data, distillation, eval."""
