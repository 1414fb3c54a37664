"""Request bodies of the OpenAI-compatible endpoints (pydantic), and their mapping to `FusionRequest`.

OpenAI's fields are typed here; the kvfuse extension object (`"kvfuse": {"chunk_ids", "top_k",
"selector", "ratio"}`) is only checked for unknown keys, its values are the engine's to judge
(`RequestError` names the field). Unknown top-level fields (`user`, `logprobs`, ...) are ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvfuse.runtime import FusionRequest

from .errors import APIError


class KvfuseOptions(BaseModel):
    """The extension object: which chunks, and how much of them to recompute."""

    model_config = ConfigDict(extra="forbid")

    chunk_ids: Any = None        # list of chunk ids in prompt order; None: retrieve top_k by the question
    top_k: Any = None            # chunks to retrieve (engine default 4)
    selector: str | None = None  # which context tokens to recompute (engine default "kvfuse")
    ratio: Any = None            # fraction of context tokens recomputed, in [0, 1] (engine default 0.15)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None      # default 0: greedy (kvfuse's default, not OpenAI's 1)
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    kvfuse: KvfuseOptions | None = None

    def fusion_request(self, default_max_tokens: int, **text) -> FusionRequest:
        fields = {k: v for k, v in (self.kvfuse.model_dump() if self.kvfuse else {}).items() if v is not None}
        if self.n != 1:
            raise APIError(400, "n: only n = 1 is served", param="n", code="invalid_value")
        stop = self.stop if isinstance(self.stop, list) else [self.stop] if self.stop else []
        gen = dict(max_new_tokens=self.max_new_tokens(default_max_tokens), stop=tuple(stop))
        if self.temperature is not None:
            gen["temperature"] = self.temperature
        if self.top_p is not None:
            gen["top_p"] = self.top_p
        return FusionRequest(**text, **fields, **gen, seed=self.seed)

    def max_new_tokens(self, default: int) -> int:
        return self.max_tokens if self.max_tokens is not None else default

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens"


class ChatCompletionRequest(_Common):
    """`POST /v1/chat/completions`: the last user message is the question."""

    messages: Any = None
    max_completion_tokens: int | None = None

    def to_fusion(self, default_max_tokens: int) -> FusionRequest:
        return self.fusion_request(default_max_tokens, messages=self.messages)

    def max_new_tokens(self, default: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_new_tokens(default)

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(_Common):
    """`POST /v1/completions`: the prompt is the question (kvfuse's template wraps it)."""

    prompt: str | list[str] = Field(default=None)

    def to_fusion(self, default_max_tokens: int) -> FusionRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one prompt (a string or a list of one string)",
                               param="prompt", code="invalid_value")
            prompt = prompt[0]
        return self.fusion_request(default_max_tokens, question=prompt)


def parse(model: type[BaseModel], data: Any) -> BaseModel:
    """Validate a decoded JSON body; a ValidationError becomes a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", param=None, code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # drop pydantic's union-member tags ("str", "list[str]") from the location
        loc = [str(p) for p in err["loc"] if str(p) not in ("str", "int", "float", "bool")
               and not str(p).startswith("list[")]
        param = ".".join(loc) if loc else None
        return_msg = f"{param}: {err['msg']}" if param else err["msg"]
        raise APIError(400, return_msg, param=param, code="invalid_value") from None
