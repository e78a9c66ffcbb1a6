"""Model names → engines. Names are looked up in a dict, exactly or lowercased; never used as paths."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from toolkit.recipes.registry import Recipe, UnknownRecipeError, get_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """One served engine with its recipe and every name clients may use for it."""

    key: str
    engine: Any
    recipe: Recipe | None
    names: tuple[str, ...]

    @property
    def context_length(self) -> int:
        """Maximum prompt + output tokens of this engine."""
        length = getattr(self.engine, "context_length", None)
        if length:
            return int(length)
        return self.recipe.context_window if self.recipe else 0

    def defaults(self, api: str) -> dict[str, Any]:
        """The recipe's default sampling for ``api`` ("openai" or "workers_ai")."""
        return dict(self.recipe.defaults.get(api, {})) if self.recipe else {}

    def estimated_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollar cost at the recipe's prices (0 without a recipe), rounded to 10 decimals."""
        if self.recipe is None:
            return 0.0
        return round(self.recipe.estimated_cost(prompt_tokens, completion_tokens), 10)


def _recipe_of(key: str, engine: Any) -> Recipe | None:
    recipe = getattr(engine, "recipe", None)
    if recipe is not None:
        return recipe
    try:
        return get_recipe(key)
    except UnknownRecipeError:
        return None


def _names_of(key: str, engine: Any, recipe: Recipe | None) -> tuple[str, ...]:
    names: list[str] = []
    candidates: Iterable[str] = (
        *((recipe.hf_id,) if recipe else ()), key,
        *tuple(getattr(engine, "model_names", ()) or ()),
        *(recipe.model_names if recipe else ()),
    )
    for name in candidates:
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return tuple(names)


class ModelRegistry:
    """Every served model under all its names (recipe name, Hugging Face id, aliases)."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        """``engines`` maps a name (usually the recipe name) to an Engine-like object."""
        self._entries: list[ModelEntry] = []
        self._by_name: dict[str, ModelEntry] = {}
        for key, engine in engines.items():
            recipe = _recipe_of(key, engine)
            entry = ModelEntry(key, engine, recipe, _names_of(key, engine, recipe))
            self._entries.append(entry)
            for name in entry.names:
                self._add(name, entry)
                self._add(name.lower(), entry)

    def _add(self, name: str, entry: ModelEntry) -> None:
        other = self._by_name.get(name)
        if other is not None and other is not entry:
            raise ValueError(f"model name {name!r} is served by two engines ({other.key}, {entry.key}); "
                             "serve each model once")
        self._by_name[name] = entry

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        """One entry per engine, in registration order."""
        return tuple(self._entries)

    def resolve(self, name: str) -> ModelEntry | None:
        """The entry for ``name`` (exact match first, then its lowercase form), or None."""
        if not isinstance(name, str):
            return None
        return self._by_name.get(name) or self._by_name.get(name.lower())

    def known_names(self) -> list[str]:
        """The primary name of every model (for error messages)."""
        return [entry.names[0] for entry in self._entries]
