from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankShard(_message.Message):
    __slots__ = ("rank", "world_size", "kv_head_start", "kv_head_end", "mlp_start", "mlp_end", "expert_start", "expert_end", "shared_start", "shared_end", "vocab_start", "vocab_end")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_START_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_END_FIELD_NUMBER: _ClassVar[int]
    MLP_START_FIELD_NUMBER: _ClassVar[int]
    MLP_END_FIELD_NUMBER: _ClassVar[int]
    EXPERT_START_FIELD_NUMBER: _ClassVar[int]
    EXPERT_END_FIELD_NUMBER: _ClassVar[int]
    SHARED_START_FIELD_NUMBER: _ClassVar[int]
    SHARED_END_FIELD_NUMBER: _ClassVar[int]
    VOCAB_START_FIELD_NUMBER: _ClassVar[int]
    VOCAB_END_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    kv_head_start: int
    kv_head_end: int
    mlp_start: int
    mlp_end: int
    expert_start: int
    expert_end: int
    shared_start: int
    shared_end: int
    vocab_start: int
    vocab_end: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., kv_head_start: _Optional[int] = ..., kv_head_end: _Optional[int] = ..., mlp_start: _Optional[int] = ..., mlp_end: _Optional[int] = ..., expert_start: _Optional[int] = ..., expert_end: _Optional[int] = ..., shared_start: _Optional[int] = ..., shared_end: _Optional[int] = ..., vocab_start: _Optional[int] = ..., vocab_end: _Optional[int] = ...) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("shard", "model_dir", "config_json", "hub_address", "max_batch", "max_context", "dtype", "shard_source", "sync_dtype")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    HUB_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SYNC_DTYPE_FIELD_NUMBER: _ClassVar[int]
    shard: RankShard
    model_dir: str
    config_json: str
    hub_address: str
    max_batch: int
    max_context: int
    dtype: str
    shard_source: str
    sync_dtype: str
    def __init__(self, shard: _Optional[_Union[RankShard, _Mapping]] = ..., model_dir: _Optional[str] = ..., config_json: _Optional[str] = ..., hub_address: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_context: _Optional[int] = ..., dtype: _Optional[str] = ..., shard_source: _Optional[str] = ..., sync_dtype: _Optional[str] = ...) -> None: ...

class ConfigureReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("layers_loaded", "layers_total", "ready", "bytes_fetched", "bytes_total")
    LAYERS_LOADED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    layers_loaded: int
    layers_total: int
    ready: bool
    bytes_fetched: int
    bytes_total: int
    def __init__(self, layers_loaded: _Optional[int] = ..., layers_total: _Optional[int] = ..., ready: _Optional[bool] = ..., bytes_fetched: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("state", "detail", "rank")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[HealthReply.State]
        IDLE: _ClassVar[HealthReply.State]
        CONFIGURED: _ClassVar[HealthReply.State]
        LOADING: _ClassVar[HealthReply.State]
        READY: _ClassVar[HealthReply.State]
        FAILED: _ClassVar[HealthReply.State]
    STATE_UNSPECIFIED: HealthReply.State
    IDLE: HealthReply.State
    CONFIGURED: HealthReply.State
    LOADING: HealthReply.State
    READY: HealthReply.State
    FAILED: HealthReply.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    state: HealthReply.State
    detail: str
    rank: int
    def __init__(self, state: _Optional[_Union[HealthReply.State, str]] = ..., detail: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("rss_bytes", "weight_bytes", "kv_cache_bytes", "steps", "threads", "peak_rss_bytes", "tokens", "memory_budget_bytes", "window_slots", "weight_bytes_read", "io_read_seconds", "io_stall_seconds", "overlap_ratio", "expert_cache_bytes", "expert_cache_slots", "expert_hits", "expert_misses", "expert_hit_rate", "expert_late_prefetches", "expert_prefetches", "expert_prediction_recall", "expert_prediction_precision", "expert_bytes_read", "expert_read_seconds", "expert_stall_seconds", "expert_cancelled_prefetches", "expert_prefetch_bytes", "expert_prefetch_bytes_read", "expert_prefetch_skipped", "expert_fetched_bytes", "expert_prefetches_used", "expert_prefetch_layers_open", "expert_prefetch_layers_off")
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SLOTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    IO_READ_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IO_STALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_RATIO_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CACHE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HITS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MISSES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LATE_PREFETCHES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREFETCHES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREDICTION_RECALL_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREDICTION_PRECISION_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    EXPERT_READ_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_STALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CANCELLED_PREFETCHES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREFETCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREFETCH_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREFETCH_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREFETCHES_USED_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREFETCH_LAYERS_OPEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PREFETCH_LAYERS_OFF_FIELD_NUMBER: _ClassVar[int]
    rss_bytes: int
    weight_bytes: int
    kv_cache_bytes: int
    steps: int
    threads: int
    peak_rss_bytes: int
    tokens: int
    memory_budget_bytes: int
    window_slots: int
    weight_bytes_read: int
    io_read_seconds: float
    io_stall_seconds: float
    overlap_ratio: float
    expert_cache_bytes: int
    expert_cache_slots: int
    expert_hits: int
    expert_misses: int
    expert_hit_rate: float
    expert_late_prefetches: int
    expert_prefetches: int
    expert_prediction_recall: float
    expert_prediction_precision: float
    expert_bytes_read: int
    expert_read_seconds: float
    expert_stall_seconds: float
    expert_cancelled_prefetches: int
    expert_prefetch_bytes: int
    expert_prefetch_bytes_read: int
    expert_prefetch_skipped: int
    expert_fetched_bytes: int
    expert_prefetches_used: int
    expert_prefetch_layers_open: int
    expert_prefetch_layers_off: int
    def __init__(self, rss_bytes: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., steps: _Optional[int] = ..., threads: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., window_slots: _Optional[int] = ..., weight_bytes_read: _Optional[int] = ..., io_read_seconds: _Optional[float] = ..., io_stall_seconds: _Optional[float] = ..., overlap_ratio: _Optional[float] = ..., expert_cache_bytes: _Optional[int] = ..., expert_cache_slots: _Optional[int] = ..., expert_hits: _Optional[int] = ..., expert_misses: _Optional[int] = ..., expert_hit_rate: _Optional[float] = ..., expert_late_prefetches: _Optional[int] = ..., expert_prefetches: _Optional[int] = ..., expert_prediction_recall: _Optional[float] = ..., expert_prediction_precision: _Optional[float] = ..., expert_bytes_read: _Optional[int] = ..., expert_read_seconds: _Optional[float] = ..., expert_stall_seconds: _Optional[float] = ..., expert_cancelled_prefetches: _Optional[int] = ..., expert_prefetch_bytes: _Optional[int] = ..., expert_prefetch_bytes_read: _Optional[int] = ..., expert_prefetch_skipped: _Optional[int] = ..., expert_fetched_bytes: _Optional[int] = ..., expert_prefetches_used: _Optional[int] = ..., expert_prefetch_layers_open: _Optional[int] = ..., expert_prefetch_layers_off: _Optional[int] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
