"""deepseek_pt: DeepSeek-V3-style pretraining (MLA + MoE) on DeepSpeed."""
