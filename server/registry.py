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
    adapter: str | None = None
    """A LoRA adapter of the engine (names: ``ADAPTER``, ``BASE:ADAPTER``), or None for the base model."""
    parent: str | None = None
    """For an adapter: the base model's primary name."""

    def with_adapter(self, name: str) -> "ModelEntry | None":
        """This base model's entry for its adapter ``name`` (None when it has no such adapter)."""
        if name not in _adapter_names(self.engine):
            return None
        return ModelEntry(self.key, self.engine, _adapter_entry_names(self.names, name), name, self.names[0])

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters the engine serves (none for engines that cannot serve adapters)."""
        return _adapter_names(self.engine)

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


def _adapter_names(engine: Engine) -> tuple[str, ...]:
    return tuple(getattr(engine, "adapter_names", ()) or ())


def _adapter_entry_names(base_names: tuple[str, ...], adapter: str) -> tuple[str, ...]:
    """``BASE:ADAPTER`` (primary base name first, then every alias) and the adapter's own name."""
    return (f"{base_names[0]}:{adapter}", adapter, *(f"{n}:{adapter}" for n in base_names[1:]))


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
        self._adapters: list[ModelEntry] = []
        for entry in self._entries:  # after every base name, so an adapter never shadows a model
            for adapter in entry.adapter_names:
                adapted = entry.with_adapter(adapter)
                self._adapters.append(adapted)
                for name in adapted.names:
                    self._add(name, adapted)
                    self._add(name.lower(), adapted)

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

    @property
    def adapter_entries(self) -> tuple[ModelEntry, ...]:
        """One entry per served LoRA adapter (``parent`` is its base model)."""
        return tuple(self._adapters)

    def resolve(self, name: str) -> ModelEntry | None:
        """The entry for ``name`` (exact match first, then its lowercase form), or None."""
        if not isinstance(name, str):
            return None
        return self._by_name.get(name) or self._by_name.get(name.lower())

    def known_names(self) -> list[str]:
        """The primary name of every model (for error messages)."""
        return [entry.names[0] for entry in self._entries]
