"""Validating an ONNX engine + adapter (steps 4-5 of ``export/lora.py``): the reference and the runner.

``peft_reference`` is the adapter's golden reference, the base checkpoint in PyTorch fp32 + PEFT on the
engine's golden prompts (used by both engine targets); ``adapter_runner`` is the ONNX validation runner
over ``model.lora.onnx`` with one adapter's LoRA inputs fed on every step. Kept apart because these are the
only parts of export-lora that load PyTorch/PEFT or onnxruntime, and both only run for validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.artifact.lora import LORA_MODEL_FILE, a_input, b_input


def peft_reference(checkpoint: Path, adapter_dir: Path, base_reference):
    """The golden prompts of ``base_reference`` through PyTorch fp32 + PEFT: greedy tokens and first-step top-k."""
    import torch
    from peft import PeftModel

    from toolkit.export.golden import GoldenCase, Reference, top_k_of
    from toolkit.export.pytorch_check import load_pytorch_model

    model = PeftModel.from_pretrained(load_pytorch_model(checkpoint), str(adapter_dir)).eval()
    cases = []
    with torch.inference_mode():
        for base_case in base_reference.cases:
            out = model(input_ids=torch.tensor([base_case.prompt_ids]), use_cache=True)
            first = out.logits[0, -1].float().numpy()
            tokens = [int(first.argmax())]
            past = out.past_key_values
            while len(tokens) < base_reference.max_new_tokens:
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tokens.append(int(out.logits[0, -1].argmax()))
            ids, logits = top_k_of(first, base_reference.top_k)
            cases.append(GoldenCase(messages=base_case.messages, prompt_ids=list(base_case.prompt_ids),
                                    greedy_ids=tokens, first_topk_ids=ids, first_topk_logits=logits))
    return Reference(chat_format=base_reference.chat_format, max_new_tokens=base_reference.max_new_tokens,
                     top_k=base_reference.top_k, cases=cases, produced_by="pytorch fp32 + peft")



class _AdapterFeeds:
    """An onnxruntime session whose every run also gets one adapter's batch-1 LoRA inputs."""

    def __init__(self, session, feeds: dict[str, np.ndarray]):
        self._session, self._feeds = session, feeds

    def run(self, names, feeds):
        return self._session.run(names, {**feeds, **self._feeds})

    def __getattr__(self, name):
        return getattr(self._session, name)


def batch1_feeds(modules: dict[str, tuple[int, int]], tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LoRA inputs for one row with this adapter (rank 0 for modules it does not target)."""
    feeds = {}
    for module, (fan_in, fan_out) in modules.items():
        a = tensors.get(f"{module}.A", np.zeros((fan_in, 0), np.float32))
        b = tensors.get(f"{module}.B", np.zeros((0, fan_out), np.float32))
        feeds[a_input(module)], feeds[b_input(module)] = a[None], b[None]
    return feeds


def adapter_runner(engine_dir: Path, modules: dict, tensors: dict[str, np.ndarray]):
    """A validation runner (``OrtCausalLM``) over the engine's LoRA graph with the adapter applied."""
    from toolkit.export.ort_runner import OrtCausalLM

    runner = OrtCausalLM(engine_dir / LORA_MODEL_FILE)
    runner.session = _AdapterFeeds(runner.session, batch1_feeds(modules, tensors))
    runner.input_names -= set(batch1_feeds(modules, {}))
    return runner
