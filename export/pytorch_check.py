"""The exporter's own check, tightened: the fp32 ONNX export must match the PyTorch model.

optimum validates one random input at atol 1e-5 on a few outputs; here every golden prompt (the
long ones included, so a graph that mishandles a sliding window cannot become the reference) plus
its reference continuation is run teacher-forced through both, and every position must have the
same argmax and logits within ``ATOL``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.export.golden import Reference

ATOL = 1e-3


def pytorch_teacher_forced(model, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
    """PyTorch logits predicting each continuation token, like ``OrtCausalLM.teacher_forced``.

    Only the last ``len(continuation)`` positions go through the LM head (``logits_to_keep``): over the
    long golden prompt the full ``[2,326, 262,144]`` fp32 logits would be 2.4 GB and most of the time."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(continuation[:-1])], dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=len(continuation)).logits[0]
    return logits[-len(continuation) :].float().numpy()


def load_pytorch_model(checkpoint: Path):
    """The checkpoint in fp32 with eager attention, the closest match to the exported graph."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="float32", attn_implementation="eager")
    return model.eval()


def compare_with_pytorch(checkpoint: Path, onnx_runner, reference: Reference) -> dict:
    """Max-abs logits diff and argmax agreement between PyTorch and the fp32 ONNX runner."""
    model = load_pytorch_model(checkpoint)
    worst, agree, total = 0.0, 0, 0
    for case in reference.all_cases():  # the long prompts too: the reference itself must be right past a window
        torch_logits = pytorch_teacher_forced(model, case.prompt_ids, case.greedy_ids)
        onnx_logits = onnx_runner.teacher_forced(case.prompt_ids, case.greedy_ids)
        worst = max(worst, float(np.max(np.abs(torch_logits - onnx_logits))))
        agree += int(np.sum(torch_logits.argmax(-1) == onnx_logits.argmax(-1)))
        total += torch_logits.shape[0]
    return {
        "max_abs_diff": worst,
        "argmax_agreement": agree / total,
        "positions": total,
        "atol": ATOL,
        "passed": worst <= ATOL and agree == total,
    }
