"""Interoperability: HF transformers DeepseekV3 checkpoints (`hf`) and one loader for every kind of
checkpoint that generation, evaluation and conversion accept (`checkpoints`)."""
