"""plad-ray: PLaD distillation (teacher > student pseudo-preference pairs) on Ray, vLLM and DeepSpeed."""
