"""OpenAI-compatible API (DeepInfra flavour): schemas, adapters, stream chunks, routes, errors."""

from toolkit.server.openai import errors  # noqa: F401  (used by the app's fallback handler)
