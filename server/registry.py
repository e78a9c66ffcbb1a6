"""Model names → engines. Names are looked up in a dict, exactly or lowercased; never used as paths."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from toolkit.recipes.registry import Recipe
from toolkit.runtime.types import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """One served engine with its recipe and every name clients may use for it."""

    key: str
    engine: Engine
    names: tuple[str, ...]

    @property
    def recipe(self) -> Recipe:
        return self.engine.recipe

    @property
    def context_length(self) -> int:
        """Maximum prompt + output tokens of this engine."""
        return self.engine.context_length

    def defaults(self, api: str) -> dict[str, Any]:
        """The recipe's default sampling for ``api`` ("openai" or "workers_ai")."""
        return dict(self.recipe.defaults.get(api, {}))

    def estimated_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollar cost at the recipe's prices, rounded to 10 decimals."""
        return round(self.recipe.estimated_cost(prompt_tokens, completion_tokens), 10)


def _names_of(key: str, engine: Engine) -> tuple[str, ...]:
    """Hugging Face id first, then the key (usually the recipe name) and the recipe's aliases, without repeats."""
    names: list[str] = []
    for name in (engine.recipe.hf_id, key, *engine.model_names, *engine.recipe.model_names):
        if name and name not in names:
            names.append(name)
    return tuple(names)


class ModelRegistry:
    """Every served model under all its names (recipe name, Hugging Face id, aliases)."""

    def __init__(self, engines: Mapping[str, Engine]) -> None:
        """``engines`` maps a name (usually the recipe name) to an engine."""
        self._entries: list[ModelEntry] = []
        self._by_name: dict[str, ModelEntry] = {}
        for key, engine in engines.items():
            entry = ModelEntry(key, engine, _names_of(key, engine))
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
