"""PEFT LoRA adapters made at test time on the tiny checkpoints (fixed seed, rank 8, non-zero B)."""

from __future__ import annotations

import shutil
from pathlib import Path

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_peft_adapter(checkpoint: Path, out: Path, seed: int, targets=ALL_PROJECTIONS, b_std: float = 0.1,
                      rank: int = 8, alpha: int = 16, rslora: bool = False) -> Path:
    """A PEFT LoRA adapter on ``checkpoint`` whose B is random (PEFT initialises B to zero: no effect)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft_model.save_pretrained(out)
    return out


def copy_engine(engine_dir: Path, out: Path) -> Path:
    """A private copy of a shared session engine (export-lora writes into the engine directory)."""
    shutil.copytree(engine_dir, out)
    return out
