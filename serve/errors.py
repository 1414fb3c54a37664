"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

    raise APIError(400, "ratio outside [0, 1]", param="kvfuse.ratio")   # -> 400 JSON, server stays up

`from_request_error` turns the engine's `RequestError` (which names the request field) into one,
with the field spelled as the HTTP body spells it (`max_new_tokens` -> `max_tokens`,
`ratio` -> `kvfuse.ratio`).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from kvfuse.runtime import RequestError

# engine field -> body field (the kvfuse options live in the "kvfuse" extension object)
_KVFUSE_FIELDS = ("chunk_ids", "top_k", "selector", "ratio")

_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An answer other than 200: HTTP status, message for the user, the offending body field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def body_field(engine_field: str, question_field: str, max_tokens_field: str = "max_tokens") -> str:
    """The body's name for an engine request field (`ratio` -> `kvfuse.ratio`)."""
    head, _, rest = engine_field.partition("[")
    if head in _KVFUSE_FIELDS:
        return f"kvfuse.{engine_field}"
    if head == "max_new_tokens":
        return max_tokens_field
    if head == "question":
        return question_field
    return engine_field


def from_request_error(e: RequestError, question_field: str, max_tokens_field: str = "max_tokens") -> APIError:
    param = body_field(e.field, question_field, max_tokens_field)
    code = "context_length_exceeded" if "positions" in e.message else "invalid_value"
    return APIError(e.status, f"{param}: {e.message}", param=param, code=code)
