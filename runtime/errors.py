"""Errors the runtime raises to its callers; the server maps each to its API's error envelope in one place."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every runtime error; ``message`` is safe to show to a client."""

    status = 500

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(EngineError):
    """The request cannot be served as given (bad messages, unknown token ids, ...)."""

    status = 400


class PromptTooLongError(InvalidRequestError):
    """Prompt (+ max_tokens) does not fit the context window or the KV cache."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int, what: str = "context window"):
        super().__init__(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, "
            f"but the model's {what} is {limit} tokens; shorten the prompt or lower max_tokens",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class OverloadedError(EngineError):
    """The waiting queue is full; retry later."""

    status = 429

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"the server is overloaded ({waiting} requests waiting, limit {limit}); retry later")
        self.retry_after_s = 1


class EngineStoppedError(EngineError):
    """The engine is not running (not started yet, or shutting down)."""

    status = 503


class EngineFailureError(EngineError):
    """A model step failed; only the requests in that batch see this."""

    status = 500
