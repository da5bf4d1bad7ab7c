from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_KIND_UNSPECIFIED: _ClassVar[SessionKind]
    SESSION_KIND_VERIFY: _ClassVar[SessionKind]
    SESSION_KIND_GENERATE: _ClassVar[SessionKind]
SESSION_KIND_UNSPECIFIED: SessionKind
SESSION_KIND_VERIFY: SessionKind
SESSION_KIND_GENERATE: SessionKind

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_context_tokens", "max_draft_tokens", "max_new_tokens", "max_return_top_k", "max_support")
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETURN_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    max_context_tokens: int
    max_draft_tokens: int
    max_new_tokens: int
    max_return_top_k: int
    max_support: int
    def __init__(self, max_context_tokens: _Optional[int] = ..., max_draft_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_return_top_k: _Optional[int] = ..., max_support: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "tokenizer_fingerprint", "vocab_size", "limits", "capabilities", "server_version", "device", "dtype")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    tokenizer_fingerprint: str
    vocab_size: int
    limits: Limits
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    server_version: str
    device: str
    dtype: str
    def __init__(self, model_name: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., capabilities: _Optional[_Iterable[str]] = ..., server_version: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("prompt_ids", "sampling", "max_new_tokens", "tokenizer_fingerprint", "kind", "return_top_k", "stop_ids", "client_id", "keeps_bonus")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOP_K_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KEEPS_BONUS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    max_new_tokens: int
    tokenizer_fingerprint: str
    kind: SessionKind
    return_top_k: int
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    client_id: str
    keeps_bonus: bool
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., kind: _Optional[_Union[SessionKind, str]] = ..., return_top_k: _Optional[int] = ..., stop_ids: _Optional[_Iterable[int]] = ..., client_id: _Optional[str] = ..., keeps_bonus: _Optional[bool] = ...) -> None: ...

class SparseDist(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class DraftFrame(_message.Message):
    __slots__ = ("seq", "epoch", "position", "committed_ids", "draft_ids", "draft_dists", "expects_continuation", "parents", "branch_of")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTS_CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    BRANCH_OF_FIELD_NUMBER: _ClassVar[int]
    seq: int
    epoch: int
    position: int
    committed_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_dists: _containers.RepeatedCompositeFieldContainer[SparseDist]
    expects_continuation: bool
    parents: _containers.RepeatedScalarFieldContainer[int]
    branch_of: int
    def __init__(self, seq: _Optional[int] = ..., epoch: _Optional[int] = ..., position: _Optional[int] = ..., committed_ids: _Optional[_Iterable[int]] = ..., draft_ids: _Optional[_Iterable[int]] = ..., draft_dists: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., expects_continuation: _Optional[bool] = ..., parents: _Optional[_Iterable[int]] = ..., branch_of: _Optional[int] = ...) -> None: ...

class SessionClose(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class EdgeFrame(_message.Message):
    __slots__ = ("open", "draft", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    draft: DraftFrame
    close: SessionClose
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., draft: _Optional[_Union[DraftFrame, _Mapping]] = ..., close: _Optional[_Union[SessionClose, _Mapping]] = ...) -> None: ...

class SessionReady(_message.Message):
    __slots__ = ("session_id", "prompt_length", "prefill_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_length: int
    prefill_ms: float
    def __init__(self, session_id: _Optional[str] = ..., prompt_length: _Optional[int] = ..., prefill_ms: _Optional[float] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("seq", "epoch", "committed_length", "num_committed", "num_accepted", "next_token", "labels", "num_labels", "target_top_k", "compute_ms", "stale", "accepted_nodes", "shared_pass", "server_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOP_K_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_NODES_FIELD_NUMBER: _ClassVar[int]
    SHARED_PASS_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    epoch: int
    committed_length: int
    num_committed: int
    num_accepted: int
    next_token: int
    labels: bytes
    num_labels: int
    target_top_k: _containers.RepeatedCompositeFieldContainer[SparseDist]
    compute_ms: float
    stale: bool
    accepted_nodes: _containers.RepeatedScalarFieldContainer[int]
    shared_pass: bool
    server_ms: float
    def __init__(self, seq: _Optional[int] = ..., epoch: _Optional[int] = ..., committed_length: _Optional[int] = ..., num_committed: _Optional[int] = ..., num_accepted: _Optional[int] = ..., next_token: _Optional[int] = ..., labels: _Optional[bytes] = ..., num_labels: _Optional[int] = ..., target_top_k: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., compute_ms: _Optional[float] = ..., stale: _Optional[bool] = ..., accepted_nodes: _Optional[_Iterable[int]] = ..., shared_pass: _Optional[bool] = ..., server_ms: _Optional[float] = ...) -> None: ...

class GeneratedTokens(_message.Message):
    __slots__ = ("ids", "compute_ms")
    IDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    compute_ms: float
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class SessionDone(_message.Message):
    __slots__ = ("reason", "num_generated")
    REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_FIELD_NUMBER: _ClassVar[int]
    reason: str
    num_generated: int
    def __init__(self, reason: _Optional[str] = ..., num_generated: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("status_code", "message", "seq")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    message: str
    seq: int
    def __init__(self, status_code: _Optional[int] = ..., message: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class CloudFrame(_message.Message):
    __slots__ = ("ready", "verdict", "tokens", "done", "error")
    READY_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ready: SessionReady
    verdict: Verdict
    tokens: GeneratedTokens
    done: SessionDone
    error: Error
    def __init__(self, ready: _Optional[_Union[SessionReady, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., tokens: _Optional[_Union[GeneratedTokens, _Mapping]] = ..., done: _Optional[_Union[SessionDone, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
