"""Cloudflare Workers AI text-generation API: schemas, adapters, stream events, routes, errors."""

from toolkit.server.workers_ai import errors  # noqa: F401  (used by the app's fallback handler)
