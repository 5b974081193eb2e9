from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CoordinatorState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COORDINATOR_STATE_UNSPECIFIED: _ClassVar[CoordinatorState]
    COORDINATOR_STATE_STARTING: _ClassVar[CoordinatorState]
    COORDINATOR_STATE_RUNNING: _ClassVar[CoordinatorState]
    COORDINATOR_STATE_EXITED: _ClassVar[CoordinatorState]

class RpcServerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RPC_SERVER_STATE_UNSPECIFIED: _ClassVar[RpcServerState]
    RPC_SERVER_STATE_STOPPED: _ClassVar[RpcServerState]
    RPC_SERVER_STATE_STARTING: _ClassVar[RpcServerState]
    RPC_SERVER_STATE_RUNNING: _ClassVar[RpcServerState]
    RPC_SERVER_STATE_BACKOFF: _ClassVar[RpcServerState]
    RPC_SERVER_STATE_FAILED: _ClassVar[RpcServerState]
    RPC_SERVER_STATE_STOPPING: _ClassVar[RpcServerState]

class DeviceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_KIND_UNSPECIFIED: _ClassVar[DeviceKind]
    DEVICE_KIND_GPU: _ClassVar[DeviceKind]
    DEVICE_KIND_CPU: _ClassVar[DeviceKind]

class CudaMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CUDA_MODE_UNSPECIFIED: _ClassVar[CudaMode]
    CUDA_MODE_ON: _ClassVar[CudaMode]
    CUDA_MODE_OFF: _ClassVar[CudaMode]

class WatchReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WATCH_REASON_UNSPECIFIED: _ClassVar[WatchReason]
    WATCH_REASON_INITIAL: _ClassVar[WatchReason]
    WATCH_REASON_CHANGE: _ClassVar[WatchReason]
    WATCH_REASON_HEARTBEAT: _ClassVar[WatchReason]

class ModelFileState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FILE_STATE_UNSPECIFIED: _ClassVar[ModelFileState]
    MODEL_FILE_STATE_HASHING: _ClassVar[ModelFileState]
    MODEL_FILE_STATE_READY: _ClassVar[ModelFileState]
    MODEL_FILE_STATE_ERROR: _ClassVar[ModelFileState]
COORDINATOR_STATE_UNSPECIFIED: CoordinatorState
COORDINATOR_STATE_STARTING: CoordinatorState
COORDINATOR_STATE_RUNNING: CoordinatorState
COORDINATOR_STATE_EXITED: CoordinatorState
RPC_SERVER_STATE_UNSPECIFIED: RpcServerState
RPC_SERVER_STATE_STOPPED: RpcServerState
RPC_SERVER_STATE_STARTING: RpcServerState
RPC_SERVER_STATE_RUNNING: RpcServerState
RPC_SERVER_STATE_BACKOFF: RpcServerState
RPC_SERVER_STATE_FAILED: RpcServerState
RPC_SERVER_STATE_STOPPING: RpcServerState
DEVICE_KIND_UNSPECIFIED: DeviceKind
DEVICE_KIND_GPU: DeviceKind
DEVICE_KIND_CPU: DeviceKind
CUDA_MODE_UNSPECIFIED: CudaMode
CUDA_MODE_ON: CudaMode
CUDA_MODE_OFF: CudaMode
WATCH_REASON_UNSPECIFIED: WatchReason
WATCH_REASON_INITIAL: WatchReason
WATCH_REASON_CHANGE: WatchReason
WATCH_REASON_HEARTBEAT: WatchReason
MODEL_FILE_STATE_UNSPECIFIED: ModelFileState
MODEL_FILE_STATE_HASHING: ModelFileState
MODEL_FILE_STATE_READY: ModelFileState
MODEL_FILE_STATE_ERROR: ModelFileState

class CoordinatorStatus(_message.Message):
    __slots__ = ("id", "model", "state", "pid", "url", "last_exit", "last_output", "backend_lost", "state_since_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_LOST_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    state: CoordinatorState
    pid: int
    url: str
    last_exit: str
    last_output: _containers.RepeatedScalarFieldContainer[str]
    backend_lost: bool
    state_since_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[_Union[CoordinatorState, str]] = ..., pid: _Optional[int] = ..., url: _Optional[str] = ..., last_exit: _Optional[str] = ..., last_output: _Optional[_Iterable[str]] = ..., backend_lost: _Optional[bool] = ..., state_since_unix_ms: _Optional[int] = ...) -> None: ...

class StartCoordinatorRequest(_message.Message):
    __slots__ = ("id", "model", "model_sha256", "local_gpus", "local_layers", "rpc_endpoints", "rpc_layers", "n_layers", "ctx_per_slot", "parallel", "chat_template", "pooling", "prompt_cache_mib", "local_last", "tensor_hashes")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOCAL_GPUS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    RPC_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    RPC_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CTX_PER_SLOT_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_MIB_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LAST_FIELD_NUMBER: _ClassVar[int]
    TENSOR_HASHES_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    model_sha256: str
    local_gpus: _containers.RepeatedScalarFieldContainer[str]
    local_layers: _containers.RepeatedScalarFieldContainer[int]
    rpc_endpoints: _containers.RepeatedScalarFieldContainer[str]
    rpc_layers: _containers.RepeatedScalarFieldContainer[int]
    n_layers: int
    ctx_per_slot: int
    parallel: int
    chat_template: str
    pooling: str
    prompt_cache_mib: int
    local_last: bool
    tensor_hashes: _containers.RepeatedCompositeFieldContainer[TensorHash]
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., model_sha256: _Optional[str] = ..., local_gpus: _Optional[_Iterable[str]] = ..., local_layers: _Optional[_Iterable[int]] = ..., rpc_endpoints: _Optional[_Iterable[str]] = ..., rpc_layers: _Optional[_Iterable[int]] = ..., n_layers: _Optional[int] = ..., ctx_per_slot: _Optional[int] = ..., parallel: _Optional[int] = ..., chat_template: _Optional[str] = ..., pooling: _Optional[str] = ..., prompt_cache_mib: _Optional[int] = ..., local_last: _Optional[bool] = ..., tensor_hashes: _Optional[_Iterable[_Union[TensorHash, _Mapping]]] = ...) -> None: ...

class TensorHash(_message.Message):
    __slots__ = ("offset", "size", "fnv1a")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FNV1A_FIELD_NUMBER: _ClassVar[int]
    offset: int
    size: int
    fnv1a: int
    def __init__(self, offset: _Optional[int] = ..., size: _Optional[int] = ..., fnv1a: _Optional[int] = ...) -> None: ...

class StartCoordinatorResponse(_message.Message):
    __slots__ = ("coordinator",)
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    coordinator: CoordinatorStatus
    def __init__(self, coordinator: _Optional[_Union[CoordinatorStatus, _Mapping]] = ...) -> None: ...

class StopCoordinatorRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class StopCoordinatorResponse(_message.Message):
    __slots__ = ("coordinator",)
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    coordinator: CoordinatorStatus
    def __init__(self, coordinator: _Optional[_Union[CoordinatorStatus, _Mapping]] = ...) -> None: ...

class NodeIdentity(_message.Message):
    __slots__ = ("node_id", "hostname", "agent_version", "started_at_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    agent_version: str
    started_at_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., agent_version: _Optional[str] = ..., started_at_unix_ms: _Optional[int] = ...) -> None: ...

class LlamaCppBuild(_message.Message):
    __slots__ = ("commit", "source_id", "version", "backends", "install_dir", "rpc_protocol_version", "adopted", "patches")
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    INSTALL_DIR_FIELD_NUMBER: _ClassVar[int]
    RPC_PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    commit: str
    source_id: str
    version: str
    backends: _containers.RepeatedScalarFieldContainer[str]
    install_dir: str
    rpc_protocol_version: str
    adopted: bool
    patches: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, commit: _Optional[str] = ..., source_id: _Optional[str] = ..., version: _Optional[str] = ..., backends: _Optional[_Iterable[str]] = ..., install_dir: _Optional[str] = ..., rpc_protocol_version: _Optional[str] = ..., adopted: _Optional[bool] = ..., patches: _Optional[_Iterable[str]] = ...) -> None: ...

class RpcDevice(_message.Message):
    __slots__ = ("name", "description", "total_bytes", "free_bytes", "uuid", "pci_bus_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    total_bytes: int
    free_bytes: int
    uuid: str
    pci_bus_id: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., uuid: _Optional[str] = ..., pci_bus_id: _Optional[str] = ...) -> None: ...

class RpcServerStatus(_message.Message):
    __slots__ = ("state", "pid", "restarts", "generation", "endpoint", "protocol_version", "devices", "cache_dir", "state_since_unix_ms", "last_exit", "last_output", "next_start_unix_ms", "recent_output", "index", "slot")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    state: RpcServerState
    pid: int
    restarts: int
    generation: int
    endpoint: str
    protocol_version: str
    devices: _containers.RepeatedCompositeFieldContainer[RpcDevice]
    cache_dir: str
    state_since_unix_ms: int
    last_exit: str
    last_output: _containers.RepeatedScalarFieldContainer[str]
    next_start_unix_ms: int
    recent_output: _containers.RepeatedScalarFieldContainer[str]
    index: int
    slot: int
    def __init__(self, state: _Optional[_Union[RpcServerState, str]] = ..., pid: _Optional[int] = ..., restarts: _Optional[int] = ..., generation: _Optional[int] = ..., endpoint: _Optional[str] = ..., protocol_version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[RpcDevice, _Mapping]]] = ..., cache_dir: _Optional[str] = ..., state_since_unix_ms: _Optional[int] = ..., last_exit: _Optional[str] = ..., last_output: _Optional[_Iterable[str]] = ..., next_start_unix_ms: _Optional[int] = ..., recent_output: _Optional[_Iterable[str]] = ..., index: _Optional[int] = ..., slot: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("kind", "index", "name", "uuid", "total_bytes", "free_bytes", "used_bytes", "physical_total_bytes", "physical_free_bytes", "utilization_percent", "pci_bus_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    kind: DeviceKind
    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    physical_total_bytes: int
    physical_free_bytes: int
    utilization_percent: int
    pci_bus_id: str
    def __init__(self, kind: _Optional[_Union[DeviceKind, str]] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., physical_total_bytes: _Optional[int] = ..., physical_free_bytes: _Optional[int] = ..., utilization_percent: _Optional[int] = ..., pci_bus_id: _Optional[str] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("name", "path", "size_bytes", "sha256", "state", "mtime_unix_ms", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MTIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    size_bytes: int
    sha256: str
    state: ModelFileState
    mtime_unix_ms: int
    error: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., state: _Optional[_Union[ModelFileState, str]] = ..., mtime_unix_ms: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class HostMemory(_message.Message):
    __slots__ = ("total_bytes", "available_bytes")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    available_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("node", "build", "rpc_server", "devices", "host", "observed_at_unix_ms", "memory_limit_bytes", "rpc_servers", "models", "models_omitted", "models_dir", "rpc_cache", "rpc_layout", "coordinators", "coordinator_proxy")
    NODE_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    RPC_SERVER_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RPC_SERVERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODELS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    MODELS_DIR_FIELD_NUMBER: _ClassVar[int]
    RPC_CACHE_FIELD_NUMBER: _ClassVar[int]
    RPC_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COORDINATORS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PROXY_FIELD_NUMBER: _ClassVar[int]
    node: NodeIdentity
    build: LlamaCppBuild
    rpc_server: RpcServerStatus
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    host: HostMemory
    observed_at_unix_ms: int
    memory_limit_bytes: int
    rpc_servers: _containers.RepeatedCompositeFieldContainer[RpcServerStatus]
    models: _containers.RepeatedCompositeFieldContainer[ModelFile]
    models_omitted: int
    models_dir: str
    rpc_cache: RpcCacheSummary
    rpc_layout: str
    coordinators: _containers.RepeatedCompositeFieldContainer[CoordinatorStatus]
    coordinator_proxy: str
    def __init__(self, node: _Optional[_Union[NodeIdentity, _Mapping]] = ..., build: _Optional[_Union[LlamaCppBuild, _Mapping]] = ..., rpc_server: _Optional[_Union[RpcServerStatus, _Mapping]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., host: _Optional[_Union[HostMemory, _Mapping]] = ..., observed_at_unix_ms: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., rpc_servers: _Optional[_Iterable[_Union[RpcServerStatus, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., models_omitted: _Optional[int] = ..., models_dir: _Optional[str] = ..., rpc_cache: _Optional[_Union[RpcCacheSummary, _Mapping]] = ..., rpc_layout: _Optional[str] = ..., coordinators: _Optional[_Iterable[_Union[CoordinatorStatus, _Mapping]]] = ..., coordinator_proxy: _Optional[str] = ...) -> None: ...

class RpcCacheSummary(_message.Message):
    __slots__ = ("cache_dir", "used_bytes", "max_bytes", "entries", "models", "in_use_bytes", "unverified", "corrupt_removed", "evictions", "evicted_bytes", "checked_at_unix_ms", "error")
    CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    IN_USE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIED_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_REMOVED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    cache_dir: str
    used_bytes: int
    max_bytes: int
    entries: int
    models: int
    in_use_bytes: int
    unverified: int
    corrupt_removed: int
    evictions: int
    evicted_bytes: int
    checked_at_unix_ms: int
    error: str
    def __init__(self, cache_dir: _Optional[str] = ..., used_bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., models: _Optional[int] = ..., in_use_bytes: _Optional[int] = ..., unverified: _Optional[int] = ..., corrupt_removed: _Optional[int] = ..., evictions: _Optional[int] = ..., evicted_bytes: _Optional[int] = ..., checked_at_unix_ms: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: AgentStatus
    def __init__(self, status: _Optional[_Union[AgentStatus, _Mapping]] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("heartbeat_interval_ms",)
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class WatchStatusResponse(_message.Message):
    __slots__ = ("status", "reason")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status: AgentStatus
    reason: WatchReason
    def __init__(self, status: _Optional[_Union[AgentStatus, _Mapping]] = ..., reason: _Optional[_Union[WatchReason, str]] = ...) -> None: ...

class StartRpcServerRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class StartRpcServerResponse(_message.Message):
    __slots__ = ("rpc_server",)
    RPC_SERVER_FIELD_NUMBER: _ClassVar[int]
    rpc_server: RpcServerStatus
    def __init__(self, rpc_server: _Optional[_Union[RpcServerStatus, _Mapping]] = ...) -> None: ...

class StopRpcServerRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class StopRpcServerResponse(_message.Message):
    __slots__ = ("rpc_server",)
    RPC_SERVER_FIELD_NUMBER: _ClassVar[int]
    rpc_server: RpcServerStatus
    def __init__(self, rpc_server: _Optional[_Union[RpcServerStatus, _Mapping]] = ...) -> None: ...

class RestartRpcServerRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class RestartRpcServerResponse(_message.Message):
    __slots__ = ("rpc_server",)
    RPC_SERVER_FIELD_NUMBER: _ClassVar[int]
    rpc_server: RpcServerStatus
    def __init__(self, rpc_server: _Optional[_Union[RpcServerStatus, _Mapping]] = ...) -> None: ...

class BuildRequest(_message.Message):
    __slots__ = ("source", "cuda", "jobs", "no_patches")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NO_PATCHES_FIELD_NUMBER: _ClassVar[int]
    source: str
    cuda: CudaMode
    jobs: int
    no_patches: bool
    def __init__(self, source: _Optional[str] = ..., cuda: _Optional[_Union[CudaMode, str]] = ..., jobs: _Optional[int] = ..., no_patches: _Optional[bool] = ...) -> None: ...

class BuildProgress(_message.Message):
    __slots__ = ("step", "message", "done", "total")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    step: str
    message: str
    done: int
    total: int
    def __init__(self, step: _Optional[str] = ..., message: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class BuildResult(_message.Message):
    __slots__ = ("build", "cached")
    BUILD_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    build: LlamaCppBuild
    cached: bool
    def __init__(self, build: _Optional[_Union[LlamaCppBuild, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class BuildResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: BuildProgress
    result: BuildResult
    def __init__(self, progress: _Optional[_Union[BuildProgress, _Mapping]] = ..., result: _Optional[_Union[BuildResult, _Mapping]] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("offset", "size", "fnv1a")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FNV1A_FIELD_NUMBER: _ClassVar[int]
    offset: int
    size: int
    fnv1a: int
    def __init__(self, offset: _Optional[int] = ..., size: _Optional[int] = ..., fnv1a: _Optional[int] = ...) -> None: ...

class StageTensorsRequest(_message.Message):
    __slots__ = ("sha256", "ranges", "rpc_server_index", "rpc_server_indexes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    RPC_SERVER_INDEX_FIELD_NUMBER: _ClassVar[int]
    RPC_SERVER_INDEXES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    rpc_server_index: int
    rpc_server_indexes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sha256: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ..., rpc_server_index: _Optional[int] = ..., rpc_server_indexes: _Optional[_Iterable[int]] = ...) -> None: ...

class StageTensorsResponse(_message.Message):
    __slots__ = ("staged", "present", "skipped_small", "bytes_written", "seconds", "rewritten", "entries", "cached_bytes", "referenced")
    STAGED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_SMALL_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFERENCED_FIELD_NUMBER: _ClassVar[int]
    staged: int
    present: int
    skipped_small: int
    bytes_written: int
    seconds: float
    rewritten: int
    entries: _containers.RepeatedScalarFieldContainer[str]
    cached_bytes: int
    referenced: int
    def __init__(self, staged: _Optional[int] = ..., present: _Optional[int] = ..., skipped_small: _Optional[int] = ..., bytes_written: _Optional[int] = ..., seconds: _Optional[float] = ..., rewritten: _Optional[int] = ..., entries: _Optional[_Iterable[str]] = ..., cached_bytes: _Optional[int] = ..., referenced: _Optional[int] = ...) -> None: ...

class PrepareModelPushRequest(_message.Message):
    __slots__ = ("name", "sha256", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class PrepareModelPushResponse(_message.Message):
    __slots__ = ("have_bytes", "already_held", "model", "free_bytes")
    HAVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALREADY_HELD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    have_bytes: int
    already_held: bool
    model: ModelFile
    free_bytes: int
    def __init__(self, have_bytes: _Optional[int] = ..., already_held: _Optional[bool] = ..., model: _Optional[_Union[ModelFile, _Mapping]] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class PushModelHeader(_message.Message):
    __slots__ = ("name", "sha256", "size_bytes", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size_bytes: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PushModelRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PushModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PushModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushModelAccepted(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class PushModelDone(_message.Message):
    __slots__ = ("model", "received_bytes", "already_held", "seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALREADY_HELD_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: ModelFile
    received_bytes: int
    already_held: bool
    seconds: float
    def __init__(self, model: _Optional[_Union[ModelFile, _Mapping]] = ..., received_bytes: _Optional[int] = ..., already_held: _Optional[bool] = ..., seconds: _Optional[float] = ...) -> None: ...

class PushModelResponse(_message.Message):
    __slots__ = ("accepted", "done")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    accepted: PushModelAccepted
    done: PushModelDone
    def __init__(self, accepted: _Optional[_Union[PushModelAccepted, _Mapping]] = ..., done: _Optional[_Union[PushModelDone, _Mapping]] = ...) -> None: ...
