"""Load the recipe TOML files in this folder and look recipes up by name, Hugging Face id or alias."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent
TARGETS = ("onnx", "trtllm")
PRECISIONS = ("fp32", "fp16", "int8")
GRAPHS = ("optimum", "gqa")  # ONNX graph builders: optimum's export, or onnxruntime-genai's GroupQueryAttention graph


class UnknownRecipeError(LookupError):
    """No recipe matches the given name, Hugging Face id or alias."""


class TargetNotSupportedError(ValueError):
    """A recipe cannot be exported to the asked target (or at the asked precision there)."""

    def __init__(self, recipe: "Recipe", target: str, precision: str | None = None):
        self.recipe, self.target, self.precision = recipe.name, target, precision
        self.supported = recipe.supported_targets()
        offered = "; ".join(f"{t} ({', '.join(p)})" for t, p in self.supported.items() if p) or "nothing"
        asked = f"{target} at {precision}" if precision and target in self.supported else target
        super().__init__(
            f"recipe {recipe.name!r} does not support {asked}; it supports {offered} (see `toolkit recipes`)"
        )


@dataclass(frozen=True)
class TrtLlmOptions:
    """TensorRT-LLM build options of one recipe."""

    precisions: tuple[str, ...]
    tensor_parallel_size: dict[str, int]
    max_batch_size: int
    max_num_tokens: int
    default_precision: str = "int8"
    dtype: str = "auto"  # the engine's 16-bit dtype: "auto" follows the checkpoint's torch_dtype, or bfloat16/float16


@dataclass(frozen=True)
class Recipe:
    """Everything the toolkit knows about one model family.

    name: short recipe name used on the command line (``--recipe``).
    hf_id: the Hugging Face model id; also the OpenAI/DeepInfra model name.
    aliases: other names clients use (the Workers AI ``@hf/...`` name among them).
    architecture: the transformers ``model_type`` the recipe expects.
    context_window: maximum prompt + output tokens.
    chat_format: key into ``toolkit.recipes.chat_format.FORMATS``.
    stop_tokens: token strings that end a turn (added to the model's EOS ids).
    fim: the fill-in-the-middle prompt template (``{prefix}`` and ``{suffix}``), "" when the model has none.
    price_per_million_tokens: ``{"input": $, "output": $}`` used for ``estimated_cost``.
    defaults: per-API default sampling, ``{"openai": {...}, "workers_ai": {...}}``.
    onnx_precisions / trtllm: what each export target supports.
    default_precision / default_graph: the ONNX precision and graph ``toolkit export`` and ``serve``
    build when not told; ``default_precision_for`` / ``default_graph_for`` are the only places that
    pick a default for a target (TensorRT-LLM: ``trtllm.default_precision``, int8 unless the recipe
    says otherwise).
    """

    name: str
    hf_id: str
    aliases: tuple[str, ...]
    architecture: str
    context_window: int
    chat_format: str
    stop_tokens: tuple[str, ...]
    price_per_million_tokens: dict[str, float]
    defaults: dict[str, dict[str, float | int]]
    onnx_precisions: tuple[str, ...]
    trtllm: TrtLlmOptions
    description: str = ""
    embedded: bool = False
    default_precision: str = "int8"
    default_graph: str = "optimum"
    model_names: tuple[str, ...] = field(default=())
    fim: str = ""

    def supported_targets(self) -> dict[str, tuple[str, ...]]:
        """``{target: precisions}`` this recipe can be exported to."""
        return {"onnx": self.onnx_precisions, "trtllm": self.trtllm.precisions}

    def supports(self, target: str, precision: str) -> bool:
        """Whether this recipe can be exported to ``target`` at ``precision``."""
        return precision in self.supported_targets().get(target, ())

    def check_supports(self, target: str, precision: str) -> None:
        """Raise ``TargetNotSupportedError`` unless this recipe exports to ``target`` at ``precision``."""
        if not self.supports(target, precision):
            raise TargetNotSupportedError(self, target, precision)

    def default_precision_for(self, target: str) -> str:
        """The precision an export to ``target`` builds when none is given."""
        if target == "onnx":
            return self.default_precision
        if target == "trtllm":
            return self.trtllm.default_precision
        raise TargetNotSupportedError(self, target)

    def default_graph_for(self, target: str) -> str:
        """The ONNX graph builder an export to ``target`` uses when none is given (``optimum`` off ONNX)."""
        if target == "onnx":
            return self.default_graph
        if target in self.supported_targets():
            return "optimum"  # the graph choice is ONNX's; other targets build no ONNX artifact
        raise TargetNotSupportedError(self, target)

    def estimated_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollar cost of one request at this recipe's per-million-token prices."""
        price = self.price_per_million_tokens
        return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1_000_000


def _parse(path: Path) -> Recipe:
    data = tomllib.loads(path.read_text())
    trt = data["targets"]["trtllm"]
    onnx = data["targets"]["onnx"]
    aliases = tuple(data.get("aliases", ()))
    return Recipe(
        name=data["name"],
        hf_id=data["hf_id"],
        aliases=aliases,
        architecture=data["architecture"],
        context_window=int(data["context_window"]),
        chat_format=data["chat_format"],
        stop_tokens=tuple(data.get("stop_tokens", ())),
        price_per_million_tokens=dict(data["price_per_million_tokens"]),
        defaults={api: dict(values) for api, values in data.get("defaults", {}).items()},
        onnx_precisions=tuple(onnx["precisions"]),
        trtllm=TrtLlmOptions(
            precisions=tuple(trt["precisions"]),
            tensor_parallel_size={k: int(v) for k, v in trt["tensor_parallel_size"].items()},
            max_batch_size=int(trt["max_batch_size"]),
            max_num_tokens=int(trt["max_num_tokens"]),
            default_precision=trt.get("default_precision", "int8"),
            dtype=trt.get("dtype", "auto"),
        ),
        description=data.get("description", ""),
        embedded=bool(data.get("embedded", False)),
        default_precision=onnx.get("default_precision", "int8"),
        default_graph=onnx.get("default_graph", "optimum"),
        model_names=(data["name"], data["hf_id"], *aliases),
        fim=data.get("fim", ""),
    )


@functools.cache
def all_recipes() -> tuple[Recipe, ...]:
    """Every recipe shipped in ``recipes/*.toml``, sorted by name."""
    return tuple(sorted((_parse(p) for p in RECIPE_DIR.glob("*.toml")), key=lambda r: r.name))


def get_recipe(name: str) -> Recipe:
    """The recipe whose name, Hugging Face id or alias is ``name`` (case-insensitive)."""
    wanted = name.strip().lower()
    for recipe in all_recipes():
        if wanted in (n.lower() for n in recipe.model_names):
            return recipe
    known = ", ".join(r.name for r in all_recipes())
    raise UnknownRecipeError(f"unknown recipe {name!r}; known recipes: {known} (see `toolkit recipes`)")
