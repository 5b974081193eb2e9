"""Domain objects → wire messages. The only place that knows both shapes."""

from __future__ import annotations

from llamafleet.agent.coordinators import CoordinatorRequest, CoordinatorSnapshot
from llamafleet.agent.core import AgentSnapshot
from llamafleet.agent.devices import DeviceInfo
from llamafleet.agent.gpus import is_cuda_device
from llamafleet.agent.models import ModelFile
from llamafleet.agent.rpc_cache import CacheSummary
from llamafleet.agent.supervisor import RpcServerSnapshot, RpcState
from llamafleet.common.llamacpp.build import BuildEvent
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.proto.v1 import agent_pb2 as pb

_STATES = {
    RpcState.STOPPED: pb.RPC_SERVER_STATE_STOPPED,
    RpcState.STARTING: pb.RPC_SERVER_STATE_STARTING,
    RpcState.RUNNING: pb.RPC_SERVER_STATE_RUNNING,
    RpcState.BACKOFF: pb.RPC_SERVER_STATE_BACKOFF,
    RpcState.FAILED: pb.RPC_SERVER_STATE_FAILED,
    RpcState.STOPPING: pb.RPC_SERVER_STATE_STOPPING,
}
_KINDS = {"gpu": pb.DEVICE_KIND_GPU, "cpu": pb.DEVICE_KIND_CPU}
_MODEL_STATES = {"hashing": pb.MODEL_FILE_STATE_HASHING, "ready": pb.MODEL_FILE_STATE_READY,
                 "error": pb.MODEL_FILE_STATE_ERROR}


def build_to_proto(manifest: Manifest | None) -> pb.LlamaCppBuild:
    if manifest is None:
        return pb.LlamaCppBuild()
    return pb.LlamaCppBuild(
        commit=manifest.commit or "",
        source_id=manifest.source_id,
        version=manifest.version,
        backends=manifest.backends,
        install_dir=str(manifest.install_dir),
        rpc_protocol_version=manifest.rpc_protocol_version,
        adopted=manifest.adopted,
        patches=manifest.patch_names,
    )


def rpc_server_to_proto(snap: RpcServerSnapshot) -> pb.RpcServerStatus:
    return pb.RpcServerStatus(
        index=snap.index,
        state=_STATES[snap.state],
        pid=snap.pid,
        restarts=snap.restarts,
        generation=snap.generation,
        endpoint=snap.endpoint,
        protocol_version=snap.protocol_version,
        devices=rpc_devices_to_proto(snap),
        cache_dir=snap.cache_dir,
        state_since_unix_ms=snap.state_since_unix_ms,
        last_exit=snap.last_exit,
        last_output=list(snap.last_output),
        next_start_unix_ms=snap.next_start_unix_ms,
        recent_output=list(snap.recent_output),
        slot=snap.slot,
    )


def rpc_devices_to_proto(snap: RpcServerSnapshot) -> list[pb.RpcDevice]:
    """The banner's devices, each CUDA one with the GPU it was pinned to (in banner order)."""
    ids = iter(snap.gpu_ids)
    out = []
    for d in snap.devices:
        uuid, bus = next(ids, ("", "")) if is_cuda_device(d.name) else ("", "")
        out.append(pb.RpcDevice(name=d.name, description=d.description, total_bytes=d.total_bytes,
                                free_bytes=d.free_bytes, uuid=uuid, pci_bus_id=bus))
    return out


def device_to_proto(device: DeviceInfo) -> pb.Device:
    message = pb.Device(
        kind=_KINDS[device.kind], index=device.index, name=device.name, uuid=device.uuid,
        total_bytes=device.total_bytes, free_bytes=device.free_bytes, used_bytes=device.used_bytes,
        physical_total_bytes=device.physical_total_bytes, physical_free_bytes=device.physical_free_bytes,
        pci_bus_id=device.pci_bus_id,
    )
    if device.utilization_percent is not None:
        message.utilization_percent = device.utilization_percent
    return message


def model_file_to_proto(model: ModelFile) -> pb.ModelFile:
    return pb.ModelFile(name=model.name, path=model.path, size_bytes=model.size_bytes, sha256=model.sha256,
                        state=_MODEL_STATES[model.state], mtime_unix_ms=model.mtime_ns // 1_000_000,
                        error=model.error)


def cache_summary_to_proto(summary: CacheSummary) -> pb.RpcCacheSummary:
    return pb.RpcCacheSummary(
        cache_dir=summary.cache_dir, used_bytes=summary.used_bytes, max_bytes=summary.max_bytes,
        entries=summary.entries, models=summary.models, in_use_bytes=summary.in_use_bytes,
        unverified=summary.unverified, corrupt_removed=summary.corrupt_removed, evictions=summary.evictions,
        evicted_bytes=summary.evicted_bytes, checked_at_unix_ms=summary.checked_at_unix_ms, error=summary.error,
    )


_COORDINATOR_STATES = {"starting": pb.COORDINATOR_STATE_STARTING, "running": pb.COORDINATOR_STATE_RUNNING,
                       "exited": pb.COORDINATOR_STATE_EXITED}


def coordinator_to_proto(snap: CoordinatorSnapshot) -> pb.CoordinatorStatus:
    return pb.CoordinatorStatus(
        id=snap.id, model=snap.model, state=_COORDINATOR_STATES[snap.state], pid=snap.pid, url=snap.url,
        last_exit=snap.last_exit, last_output=list(snap.last_output), backend_lost=snap.backend_lost,
        state_since_unix_ms=snap.state_since_unix_ms)


def coordinator_from_proto(message: pb.StartCoordinatorRequest) -> CoordinatorRequest:
    return CoordinatorRequest(
        id=message.id, model=message.model, model_sha256=message.model_sha256,
        local_gpus=tuple(message.local_gpus), local_layers=tuple(message.local_layers),
        rpc_endpoints=tuple(message.rpc_endpoints), rpc_layers=tuple(message.rpc_layers),
        n_layers=message.n_layers, ctx_per_slot=message.ctx_per_slot, parallel=message.parallel,
        chat_template=message.chat_template, pooling=message.pooling, prompt_cache_mib=message.prompt_cache_mib,
        local_last=message.local_last,
        tensor_hashes=tuple((t.offset, t.size, t.fnv1a) for t in message.tensor_hashes))


def status_to_proto(snap: AgentSnapshot) -> pb.AgentStatus:
    status = pb.AgentStatus(
        node=pb.NodeIdentity(
            node_id=snap.node.node_id, hostname=snap.node.hostname,
            agent_version=snap.node.agent_version, started_at_unix_ms=snap.node.started_at_unix_ms,
        ),
        build=build_to_proto(snap.build),
        rpc_server=rpc_server_to_proto(snap.rpc_server),
        rpc_servers=[rpc_server_to_proto(r) for r in snap.rpc_servers],
        devices=[device_to_proto(d) for d in snap.devices],
        host=pb.HostMemory(total_bytes=snap.host.total_bytes, available_bytes=snap.host.available_bytes),
        observed_at_unix_ms=snap.observed_at_unix_ms,
        memory_limit_bytes=snap.memory_limit_bytes,
        models=[model_file_to_proto(m) for m in snap.models],
        models_omitted=snap.models_omitted,
        models_dir=snap.models_dir,
        rpc_layout=snap.rpc_layout,
        coordinators=[coordinator_to_proto(c) for c in snap.coordinators],
        coordinator_proxy=snap.coordinator_proxy,
    )
    if snap.rpc_cache is not None:
        status.rpc_cache.CopyFrom(cache_summary_to_proto(snap.rpc_cache))
    return status


def build_event_to_proto(event: BuildEvent) -> pb.BuildResponse:
    return pb.BuildResponse(progress=pb.BuildProgress(step=event.step, message=event.message,
                                                      done=event.done, total=event.total))
