"""Tiny random-weight checkpoints (2 layers, hidden 64) of every recipe architecture, with a real tokenizer.

Weights use a large init range so the logits are peaked: a random model with nearly flat logits would
make any argmax comparison meaningless.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = {
    "gemma": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>", "extra": ["<start_of_turn>", "<end_of_turn>"]},
    "chatml": {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": None, "extra": ["<|im_start|>", "<|im_end|>"]},
    "codellama70b": {"bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>", "extra": ["<step>"]},
}
CORPUS = [
    "Write a Python function that reverses a string. def reverse(s): return s[::-1]",
    "What is the capital of France? Paris is the capital of France.",
    "You are a concise assistant. Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 100: 101, 103, 107.",
    "Translate good morning into German and Japanese: Guten Morgen, おはようございます.",
    "Hello! How can I help? Tell me a short joke about computers.",
    "SELECT * FROM users WHERE age > 30; Summarize the plot of Romeo and Juliet in one sentence.",
    "user model assistant system Source: Destination: The quick brown fox jumps over the lazy dog. 😀 🎉 日本語",
]


def build_tokenizer(chat_format: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a small corpus, with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPECIAL_TOKENS[chat_format]
    specials = [t for t in (spec["pad"], spec["eos"], spec["bos"], spec["unk"], *spec["extra"]) if t]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        unk_token=spec["unk"],
        additional_special_tokens=spec["extra"],
    )


def tiny_config(architecture: str, tokenizer):
    """A 2-layer, hidden-64 config of ``architecture`` matching ``tokenizer``'s ids."""
    import transformers

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if architecture == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if architecture == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **common)
    if architecture == "gemma":
        return transformers.GemmaConfig(num_key_value_heads=1, head_dim=16, **common)
    if architecture == "gemma3_text":
        return transformers.Gemma3TextConfig(
            num_key_value_heads=1, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"], **common
        )
    raise KeyError(f"no tiny-model builder for architecture {architecture!r}: add one in tests/tiny_models.py")


def _fit(model, tokenizer, chat_format: str, steps: int) -> None:
    """A few optimizer steps on the chat-formatted corpus: peaked, structured predictions instead of noise."""
    import torch

    from toolkit.recipes.chat_format import render_chat

    texts = [render_chat(chat_format, [{"role": "user", "content": line}]) + line for line in CORPUS]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_tiny_checkpoint(architecture: str, chat_format: str, out_dir: Path, seed: int = 0, train_steps: int = 40) -> Path:
    """Write a tiny checkpoint + tokenizer of ``architecture`` to ``out_dir`` (random init, briefly fitted)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(chat_format)
    config = tiny_config(architecture, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _fit(model, tokenizer, chat_format, train_steps)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_byte_fallback_tokenizer(merges):
    """Gemma-style byte-fallback BPE: printable ASCII, ``merges``, everything else as <0xNN> bytes (id 1 = <eos>)."""
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in ["▁"] + [c for c in string.printable if not c.isspace()]:
        vocab.setdefault(ch, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<eos>", "<bos>")])
    return tok
