"""The OpenAI-compatible API's request and response types: pydantic models that parse and check
every body (a 400 naming the field for anything else) and produce the OpenAPI document's schemas,
so the document and the server cannot disagree. Field names and shapes are OpenAI's; the extra
sampling fields (top_k, repetition_penalty, ignore_eos) and ``structured_outputs`` are vLLM's, as
its clients send them through the openai client's ``extra_body``.

Limits that depend on the model (max_tokens, prompt length) or on the server's configuration (n,
how many prompts) are checked where those are known, and named the same way."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from services.textgen import MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOP_STRINGS

Stop = Union[str, list[str], None]
MAX_TEMPLATE_CHARS = 32_000
Number = Union[int, float]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(Strict):
    include_usage: bool | None = None


class JsonSchemaFormat(Strict):
    name: str = Field(default="schema", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(Strict):
    """``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema`` (that schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's constraint options (one of them): a JSON schema, a regular expression, a Lark grammar
    (llguidance's dialect) or a list of choices."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SamplingFields(Strict):
    """What completions and chat share."""

    model: str = Field(min_length=1, description="a served text model (GET /v1/models), or name:version")
    max_tokens: int | None = Field(default=None, ge=1, description="most tokens to generate; the model's cap")
    temperature: Number | None = Field(default=None, ge=0, le=10)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, description="choices per prompt (at most the server's text_max_choices)")
    stop: Stop = Field(default=None, description=f"up to {MAX_STOP_STRINGS} strings of up to {MAX_STOP_CHARS} "
                                                 "characters; the text ends before the first found")
    seed: int | None = Field(default=None, ge=0, lt=2 ** 63, description="choice i of a prompt uses seed + i")
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Number] | None = Field(default=None, description="not supported: must be empty")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's extras
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: Number | None = Field(default=None, ge=0.01, le=10)
    ignore_eos: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        default="", description="a string, a list of strings, a list of token ids, or a list of those")
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="each token's log-probability plus this many alternatives")
    best_of: int | None = Field(default=None, ge=1, description="only equal to n")
    suffix: str | None = Field(default=None, description="not supported: must be null")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the same as max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(default=None, description="not supported: must be empty")
    tool_choice: Union[str, dict[str, Any], None] = Field(default=None, description="only none")
    parallel_tool_calls: bool | None = None
    # vLLM's extras
    add_generation_prompt: bool = Field(default=True, description="end the prompt with the assistant's turn opening")
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="more template variables")
    chat_template: str | None = Field(default=None, max_length=32_000,
                                      description="a jinja2 template to use instead of the model's own (a model "
                                                  "trained on plain text has none)")


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="only the model's own width")
    user: str | None = None


class TokenizeRequest(Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the model's template."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(default=None, description="default: true for a prompt, false for "
                                                                      "messages (the template writes them)")
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str = Field(min_length=1)
    tokens: list[int]


# ---- responses ------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Answer(BaseModel):
    """What every completion, chat completion and chunk repeats."""

    id: str
    created: int
    model: str


class Completion(Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(Answer):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# path -> (request model or None, response model, what it does); the OpenAPI document is built from this
ROUTES: dict[str, tuple[type[BaseModel] | None, type[BaseModel], str]] = {
    "/v1/completions": (CompletionRequest, Completion, "OpenAI-compatible completions (stream: text/event-stream "
                                                       "chunks of the same shape, then `data: [DONE]`)"),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletion,
                             "OpenAI-compatible chat, rendered by the model's chat template (stream: "
                             "chat.completion.chunk events, then `data: [DONE]`)"),
    "/v1/embeddings": (EmbeddingRequest, EmbeddingList, "Embeddings: the mean-pooled, L2-normalised last hidden state"),
    "/tokenize": (TokenizeRequest, TokenizeResponse, "Token ids of a prompt or of rendered chat messages (vLLM's)"),
    "/detokenize": (DetokenizeRequest, DetokenizeResponse, "Text of token ids (vLLM's)"),
}
