from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReasoningEffort(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASONING_EFFORT_UNSPECIFIED: _ClassVar[ReasoningEffort]
    REASONING_EFFORT_LOW: _ClassVar[ReasoningEffort]
    REASONING_EFFORT_MEDIUM: _ClassVar[ReasoningEffort]
    REASONING_EFFORT_HIGH: _ClassVar[ReasoningEffort]

class ParseStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARSE_STATUS_UNSPECIFIED: _ClassVar[ParseStatus]
    PARSE_STATUS_OK: _ClassVar[ParseStatus]
    PARSE_STATUS_MALFORMED: _ClassVar[ParseStatus]
    PARSE_STATUS_MISSING_FINAL: _ClassVar[ParseStatus]
    PARSE_STATUS_TRUNCATED: _ClassVar[ParseStatus]
    PARSE_STATUS_EXTRA_MESSAGES: _ClassVar[ParseStatus]
REASONING_EFFORT_UNSPECIFIED: ReasoningEffort
REASONING_EFFORT_LOW: ReasoningEffort
REASONING_EFFORT_MEDIUM: ReasoningEffort
REASONING_EFFORT_HIGH: ReasoningEffort
PARSE_STATUS_UNSPECIFIED: ParseStatus
PARSE_STATUS_OK: ParseStatus
PARSE_STATUS_MALFORMED: ParseStatus
PARSE_STATUS_MISSING_FINAL: ParseStatus
PARSE_STATUS_TRUNCATED: ParseStatus
PARSE_STATUS_EXTRA_MESSAGES: ParseStatus

class PromptResponse(_message.Message):
    __slots__ = ("prompt", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("turns",)
    TURNS_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    def __init__(self, turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ...) -> None: ...

class Content(_message.Message):
    __slots__ = ("text", "prompt_response", "conversation")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    text: str
    prompt_response: PromptResponse
    conversation: Conversation
    def __init__(self, text: _Optional[str] = ..., prompt_response: _Optional[_Union[PromptResponse, _Mapping]] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class PolicySelector(_message.Message):
    __slots__ = ("ref", "inline_text")
    REF_FIELD_NUMBER: _ClassVar[int]
    INLINE_TEXT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    inline_text: str
    def __init__(self, ref: _Optional[str] = ..., inline_text: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("policy", "content", "reasoning_effort", "include_reasoning", "request_id")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASONING_EFFORT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REASONING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    policy: PolicySelector
    content: Content
    reasoning_effort: ReasoningEffort
    include_reasoning: bool
    request_id: str
    def __init__(self, policy: _Optional[_Union[PolicySelector, _Mapping]] = ..., content: _Optional[_Union[Content, _Mapping]] = ..., reasoning_effort: _Optional[_Union[ReasoningEffort, str]] = ..., include_reasoning: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("parse_status", "violation", "category", "rule_ids", "confidence", "rationale", "final_text", "detail")
    PARSE_STATUS_FIELD_NUMBER: _ClassVar[int]
    VIOLATION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    RULE_IDS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    FINAL_TEXT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    parse_status: ParseStatus
    violation: bool
    category: str
    rule_ids: _containers.RepeatedScalarFieldContainer[str]
    confidence: str
    rationale: str
    final_text: str
    detail: str
    def __init__(self, parse_status: _Optional[_Union[ParseStatus, str]] = ..., violation: _Optional[bool] = ..., category: _Optional[str] = ..., rule_ids: _Optional[_Iterable[str]] = ..., confidence: _Optional[str] = ..., rationale: _Optional[str] = ..., final_text: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class PolicyVersion(_message.Message):
    __slots__ = ("id", "version", "sha256", "title", "active", "created_unix_ms", "tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    sha256: str
    title: str
    active: bool
    created_unix_ms: int
    tokens: int
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., title: _Optional[str] = ..., active: _Optional[bool] = ..., created_unix_ms: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "cached_prompt_tokens", "reasoning_tokens", "output_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_prompt_tokens: int
    reasoning_tokens: int
    output_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "time_to_first_token_ms", "time_to_verdict_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_VERDICT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    time_to_first_token_ms: float
    time_to_verdict_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., time_to_verdict_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "verdict", "reasoning", "policy", "usage", "timings", "model_fingerprint", "finish_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    verdict: Verdict
    reasoning: str
    policy: PolicyVersion
    usage: Usage
    timings: Timings
    model_fingerprint: str
    finish_reason: str
    def __init__(self, request_id: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., reasoning: _Optional[str] = ..., policy: _Optional[_Union[PolicyVersion, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., model_fingerprint: _Optional[str] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class ReasoningDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ClassifyEvent(_message.Message):
    __slots__ = ("reasoning", "result")
    REASONING_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    reasoning: ReasoningDelta
    result: ClassifyResponse
    def __init__(self, reasoning: _Optional[_Union[ReasoningDelta, _Mapping]] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("item_id", "content", "policies")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    content: Content
    policies: _containers.RepeatedCompositeFieldContainer[PolicySelector]
    def __init__(self, item_id: _Optional[str] = ..., content: _Optional[_Union[Content, _Mapping]] = ..., policies: _Optional[_Iterable[_Union[PolicySelector, _Mapping]]] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("items", "policies", "reasoning_effort", "include_reasoning", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    REASONING_EFFORT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REASONING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    policies: _containers.RepeatedCompositeFieldContainer[PolicySelector]
    reasoning_effort: ReasoningEffort
    include_reasoning: bool
    request_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., policies: _Optional[_Iterable[_Union[PolicySelector, _Mapping]]] = ..., reasoning_effort: _Optional[_Union[ReasoningEffort, str]] = ..., include_reasoning: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("item_id", "policy_ref", "result", "error")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_REF_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    policy_ref: str
    result: ClassifyResponse
    error: ItemError
    def __init__(self, item_id: _Optional[str] = ..., policy_ref: _Optional[str] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class PutPolicyRequest(_message.Message):
    __slots__ = ("text", "activate")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    text: str
    activate: bool
    def __init__(self, text: _Optional[str] = ..., activate: _Optional[bool] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class PolicyDocument(_message.Message):
    __slots__ = ("version", "text")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    version: PolicyVersion
    text: str
    def __init__(self, version: _Optional[_Union[PolicyVersion, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyVersion]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyVersion, _Mapping]]] = ...) -> None: ...

class ActivatePolicyRequest(_message.Message):
    __slots__ = ("id", "ref")
    ID_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    id: str
    ref: str
    def __init__(self, id: _Optional[str] = ..., ref: _Optional[str] = ...) -> None: ...

class RollbackPolicyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
