"""Export the trained student as an HF folder (safetensors + tokenizer) that vLLM loads.

Weights come from DeepSpeed's fp32 master copy, gathered from every rank (a collective
under ZeRO-3, so all ranks call this), and are saved in the model's own dtype. The
bf16 module weights are not used: small updates vanish when rounded to bf16.
"""

import tempfile

import torch

from plad_ray.data import storage


def full_state_dict(module, rank: int) -> dict[str, torch.Tensor]:
    """fp32 master weights of every parameter, assembled on rank 0 (empty elsewhere)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)  # None when the parameter is itself the fp32 master
        if rank == 0:
            state[name] = (full if full is not None else param.detach()).float().cpu().clone()
    return state


def export_hf(engine, plan, rank: int) -> None:
    import torch.distributed as dist
    from transformers import AutoConfig, AutoTokenizer

    state = full_state_dict(engine.module, rank)
    if rank == 0:
        config = AutoConfig.from_pretrained(plan.model_path, trust_remote_code=plan.trust_remote_code)
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        state = {k: v.to(dtype) for k, v in state.items()}
        with tempfile.TemporaryDirectory() as folder:
            engine.module.save_pretrained(folder, state_dict=state, safe_serialization=True)
            # save_pretrained records the module's dtype (bf16 under DeepSpeed bf16); the
            # weights are in the source model's dtype, so its config is the right one.
            config.save_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(plan.model_path, trust_remote_code=plan.trust_remote_code)
            tokenizer.save_pretrained(folder)
            storage.publish(folder, plan.export_uri, {"source_model": plan.model_path, "steps": plan.total_steps})
        print(f"[train] exported the trained student to {plan.export_uri}", flush=True)
    if dist.is_initialized():
        dist.barrier()
