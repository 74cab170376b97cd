"""Request and response bodies of the HTTP service (pydantic models; their fields are the OpenAPI schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from larimar.serving.storage import ID_RE, NAMESPACE_RE

MIN_TEMPERATURE = 1e-3  # a positive temperature below this is raised to it (never divides the logits by ~0)
MIN_TOP_P = 1e-6  # top_p 0 keeps only the most likely token
NAMESPACE_PATTERN = NAMESPACE_RE.pattern
ID_PATTERN = ID_RE.pattern


def clean_str(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    if "\x00" in s:
        raise ValueError("must not contain NUL characters")
    return s


Str = Annotated[str, AfterValidator(clean_str)]


def floor_temperature(t: float) -> float:
    """0 stays 0 (greedy); a positive temperature below `MIN_TEMPERATURE` becomes it."""
    return 0.0 if t == 0 else max(float(t), MIN_TEMPERATURE)


Temperature = Annotated[
    float,
    Field(ge=0.0, le=2.0, description=f"0: greedy; a positive value below {MIN_TEMPERATURE} is raised to it"),
    AfterValidator(floor_temperature),
]
TopP = Annotated[
    float, Field(ge=0.0, le=1.0, description="nucleus sampling threshold (with temperature > 0)"),
    AfterValidator(lambda p: max(float(p), MIN_TOP_P)),
]
IdStr = Annotated[str, Field(pattern=ID_PATTERN, description="1-128 of letters, digits, '_', '.', ':', '-'")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TargetStr(_Strict):
    """CounterFact's target object: {"str": "Rome"} (an "id" may come along)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    str: Str


class EditRequestBody(_Strict):
    """A CounterFact-style edit request: the fact is ``prompt.format(subject) + " " + target_new``."""

    model_config = ConfigDict(strict=True, extra="ignore")
    prompt: Str = Field(description="a template with one '{}' for the subject, e.g. '{} is located in'")
    subject: Str
    target_new: Str | TargetStr


class WriteFactsBody(_Strict):
    facts: list[Str | EditRequestBody] = Field(description="fact sentences or edit requests")
    ids: list[Str] | None = Field(default=None, description="optional ids, one per fact (default: generated)")


class CompletionBody(_Strict):
    """OpenAI /v1/completions body; unknown OpenAI fields (stop, user, ...) are accepted and ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: Str | None = None
    prompt: Str | list[Str]
    max_tokens: int = Field(default=16, ge=1, le=512)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    n: int = Field(default=1, description="only 1 is supported")
    stream: bool = Field(default=False, description="server-sent events in OpenAI's chunk format")
    memory: Str | None = Field(default=None, description="namespace whose memory conditions the completion")


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | list[dict[str, Any]] | None = None


class ChatCompletionBody(_Strict):
    """OpenAI /v1/chat/completions body (+ "memory")."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: Str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1, le=512)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=512)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    n: int = Field(default=1, description="only 1 is supported")
    stream: bool = Field(default=False, description="server-sent events in OpenAI's chunk format")
    memory: Str | None = None


def limited_bodies(
    max_fact_chars: int, max_facts: int, max_prompt_chars: int, max_messages: int, max_tokens: int
) -> tuple[type[WriteFactsBody], type[CompletionBody], type[ChatCompletionBody]]:
    """The request bodies with a service's limits as field constraints (checked, and declared in the OpenAPI
    schema, before any model work)."""
    fact = Annotated[str, AfterValidator(clean_str), Field(min_length=1, max_length=max_fact_chars)]
    part = Annotated[str, AfterValidator(clean_str), Field(max_length=max_fact_chars)]
    edit = create_model(
        "EditRequest", __base__=EditRequestBody,
        prompt=(part, Field(description="a template with one '{}' for the subject, e.g. '{} is located in'")),
        subject=(part, ...), target_new=(part | TargetStr, ...),
    )
    facts = create_model(
        "WriteFacts", __base__=WriteFactsBody,
        facts=(list[fact | edit], Field(min_length=1, max_length=max_facts, description="fact sentences or edit "
                                        "requests")),
        ids=(list[IdStr] | None, Field(default=None, min_length=1, max_length=max_facts,
                                       description="optional ids, one per fact (default: generated)")),
    )
    prompt = Annotated[str, AfterValidator(clean_str), Field(min_length=1, max_length=max_prompt_chars)]
    tokens = Annotated[int, Field(ge=1, le=max_tokens)]
    completion = create_model(
        "Completion", __base__=CompletionBody,
        prompt=(prompt | list[prompt], ...), max_tokens=(tokens, 16),
    )
    message = create_model(
        "Message", __base__=ChatMessage,
        content=(Annotated[str, AfterValidator(clean_str), Field(max_length=max_prompt_chars)]
                 | list[dict[str, Any]] | None, None),
    )
    chat = create_model(
        "ChatCompletion", __base__=ChatCompletionBody,
        messages=(list[message], Field(min_length=1, max_length=max_messages)),
        max_tokens=(tokens | None, None), max_completion_tokens=(tokens | None, None),
    )
    return facts, completion, chat


class MemoryDecision(BaseModel):
    """The scope decision reported with every completion."""

    namespace: str | None
    in_scope: bool
    nearest_id: str | None
    similarity: float | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    memory: MemoryDecision


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    memory: MemoryDecision


class FactsWritten(BaseModel):
    namespace: str
    ids: list[str]
    size: int


class FactOut(BaseModel):
    id: str
    text: str
    created: float


class FactList(BaseModel):
    namespace: str
    facts: list[FactOut]


class FactDeleted(BaseModel):
    namespace: str
    deleted: str
    size: int


class MemoryInfo(BaseModel):
    namespace: str
    size: int
    num_slots: int
    fill: float
    fingerprint: str


class Health(BaseModel):
    status: str
    fingerprint: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------------------------
# Body guard: size, UTF-8 and JSON are checked before FastAPI sees the request


@dataclass
class CompletionItem:
    """One completion of a batch handed to an engine's ``complete_batch`` (see `larimar.serving.service.Engine`).

    Attributes:
        prompt: the prompt text.
        memory: the namespace's memory (read only).
        facts: its live facts' texts by id.
        max_tokens: new tokens at most.
        temperature: 0 greedy, else the sampling temperature.
        top_p: nucleus threshold when sampling.
    """

    prompt: str
    memory: Any
    facts: dict[str, str]
    max_tokens: int
    temperature: float
    top_p: float = 1.0
