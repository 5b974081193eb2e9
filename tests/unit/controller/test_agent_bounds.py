"""bound_status: one case per way a (possibly hostile) agent's status can lie."""

from __future__ import annotations

import asyncio

from llamafleet.controller.agent_bounds import (
    MAX_BYTES,
    MAX_ITEMS,
    MAX_NAME_CHARS,
    MAX_RPC_SERVER_ITEMS,
    address_ips,
    bound_status,
)
from llamafleet.proto.v1 import agent_pb2 as pb

ADDRESS = "127.0.0.5:50051"
OWN = frozenset({"127.0.0.5"})


def status(endpoint: str = "127.0.0.5:50052", free: int = 2**30, total: int = 2**31, devices: int = 1,
           name: str = "CPU") -> pb.AgentStatus:
    rpc = pb.RpcServerStatus(state=pb.RPC_SERVER_STATE_RUNNING, endpoint=endpoint, protocol_version="3.0.0",
                             devices=[pb.RpcDevice(name=name, total_bytes=total, free_bytes=free)
                                      for _ in range(devices)])
    return pb.AgentStatus(rpc_server=rpc, devices=[pb.Device(kind=pb.DEVICE_KIND_CPU, name=name, total_bytes=total,
                                                             free_bytes=free, used_bytes=total - min(free, total))],
                          host=pb.HostMemory(total_bytes=total, available_bytes=free))


def test_an_honest_status_passes_unchanged() -> None:
    honest = status()
    bounded = bound_status(honest, ADDRESS, OWN)
    assert bounded.status == honest and bounded.reason == "" and not bounded.refused


def test_an_exabyte_free_is_clamped_to_the_maximum() -> None:
    bounded = bound_status(status(free=10**18, total=10**18), ADDRESS, OWN)
    device = bounded.status.rpc_server.devices[0]
    assert device.total_bytes == MAX_BYTES and device.free_bytes == MAX_BYTES
    assert bounded.status.devices[0].total_bytes == MAX_BYTES
    assert "above the" in bounded.reason and bounded.reason.startswith("agent status clamped:")


def test_free_above_total_is_clamped_to_total() -> None:
    bounded = bound_status(status(free=2**33, total=2**30), ADDRESS, OWN)
    assert bounded.status.rpc_server.devices[0].free_bytes == 2**30
    assert bounded.status.host.available_bytes == 2**30
    assert "RpcDevice.free_bytes above total_bytes" in bounded.reason


def test_negative_memory_arriving_as_a_huge_uint64_is_clamped() -> None:
    # -1 in an agent's int64 arithmetic becomes 2^64 - 1 on the uint64 wire.
    bounded = bound_status(status(free=2**64 - 1, total=2**30), ADDRESS, OWN)
    assert bounded.status.rpc_server.devices[0].free_bytes == 2**30


def test_ten_thousand_devices_are_cut_to_the_cap() -> None:
    bounded = bound_status(status(devices=10_000), ADDRESS, OWN)
    assert len(bounded.status.rpc_server.devices) == MAX_ITEMS
    assert "10000 reported, kept 64" in bounded.reason


def test_a_megabyte_name_is_cut() -> None:
    bounded = bound_status(status(name="x" * 2**20), ADDRESS, OWN)
    assert len(bounded.status.rpc_server.devices[0].name) == MAX_NAME_CHARS
    assert len(bounded.status.devices[0].name) == MAX_NAME_CHARS
    assert len(bounded.reason) < 1000


def test_an_endpoint_on_another_host_is_refused() -> None:
    bounded = bound_status(status(endpoint="8.8.8.8:50052"), ADDRESS, OWN)
    rpc = bounded.status.rpc_server
    assert bounded.refused and rpc.endpoint == "" and rpc.state == pb.RPC_SERVER_STATE_FAILED
    assert bounded.reason == "agent status refused: rpc endpoint 8.8.8.8:50052 is not on 127.0.0.5, the node's address"


def test_an_endpoint_on_a_neighbour_in_the_same_subnet_is_refused() -> None:
    bounded = bound_status(status(endpoint="10.0.0.6:50052"), "10.0.0.5:50051", frozenset({"10.0.0.5"}))
    assert bounded.refused and bounded.status.rpc_server.endpoint == ""


def test_a_loopback_endpoint_for_a_loopback_address_is_the_same_host() -> None:
    bounded = bound_status(status(endpoint="127.0.0.2:50052"), "127.0.0.1:50051", frozenset({"127.0.0.1"}))
    assert not bounded.refused and bounded.status.rpc_server.endpoint == "127.0.0.2:50052"


def test_a_loopback_endpoint_for_a_remote_address_is_refused() -> None:
    # The coordinator would dial its own host: not the node the operator named.
    bounded = bound_status(status(endpoint="127.0.0.1:50052"), "10.0.0.5:50051", frozenset({"10.0.0.5"}))
    assert bounded.refused


def test_a_wildcard_endpoint_means_the_nodes_own_host() -> None:
    bounded = bound_status(status(endpoint="0.0.0.0:50052"), "10.0.0.5:50051", frozenset({"10.0.0.5"}))
    assert not bounded.refused and bounded.status.rpc_server.endpoint == "10.0.0.5:50052"


def test_a_named_address_accepts_the_ips_it_resolves_to() -> None:
    ips = asyncio.run(address_ips("localhost:50051"))
    assert "127.0.0.1" in ips
    assert not bound_status(status(endpoint="127.0.0.1:50052"), "localhost:50051", ips).refused
    assert bound_status(status(endpoint="192.0.2.1:50052"), "localhost:50051", ips).refused


def test_an_unresolvable_address_refuses_every_ip_endpoint() -> None:
    assert bound_status(status(endpoint="10.0.0.5:50052"), "worker.invalid:50051", frozenset()).refused


def test_a_malformed_endpoint_is_refused() -> None:
    assert bound_status(status(endpoint="no-port"), ADDRESS, OWN).refused


def test_an_unknown_enum_value_becomes_unspecified() -> None:
    odd = status()
    odd.rpc_server.state = 99  # type: ignore[assignment]  # a newer or hostile agent: naming it would raise
    bounded = bound_status(odd, ADDRESS, OWN)
    assert bounded.status.rpc_server.state == pb.RPC_SERVER_STATE_UNSPECIFIED and "unknown value 99" in bounded.reason


def test_the_status_received_is_not_modified() -> None:
    hostile = status(endpoint="8.8.8.8:50052", devices=100)
    bound_status(hostile, ADDRESS, OWN)
    assert hostile.rpc_server.endpoint == "8.8.8.8:50052" and len(hostile.rpc_server.devices) == 100


def test_an_agent_with_hundreds_of_model_files_keeps_them_all_and_its_rpc_servers() -> None:
    honest = status()
    honest.rpc_servers.extend([honest.rpc_server, pb.RpcServerStatus(index=1, endpoint="127.0.0.5:50053")])
    honest.models.extend(pb.ModelFile(name=f"m{i}.gguf", path="/srv/models/" + "d/" * 200 + f"m{i}.gguf",
                                      size_bytes=2**30, sha256="a" * 64) for i in range(500))
    bounded = bound_status(honest, ADDRESS, OWN)
    assert bounded.status == honest and bounded.reason == ""
    lying = status()
    lying.rpc_servers.extend([honest.rpc_server, pb.RpcServerStatus(index=1, endpoint="8.8.8.8:50053")])
    refused = bound_status(lying, ADDRESS, OWN)
    assert refused.refused and refused.status.rpc_servers[1].endpoint == ""
    assert refused.status.rpc_servers[1].state == pb.RPC_SERVER_STATE_FAILED


def per_device(gpus: int, slots: int) -> pb.AgentStatus:
    """An honest agent with --rpc-layout per-device: one rpc-server per GPU in each model slot."""
    servers = [pb.RpcServerStatus(index=i, slot=i // gpus, state=pb.RPC_SERVER_STATE_RUNNING,
                                  endpoint=f"127.0.0.5:{50052 + i}", protocol_version="7.0.0",
                                  devices=[pb.RpcDevice(name="CUDA0", total_bytes=80 * 2**30, free_bytes=79 * 2**30,
                                                        uuid=f"GPU-{i % gpus:04x}")])
               for i in range(gpus * slots)]
    gpu_devices = [pb.Device(kind=pb.DEVICE_KIND_GPU, index=g, name="NVIDIA H100 80GB HBM3", uuid=f"GPU-{g:04x}",
                             total_bytes=80 * 2**30, free_bytes=79 * 2**30) for g in range(gpus)]
    return pb.AgentStatus(rpc_server=servers[0], rpc_servers=servers, devices=gpu_devices, rpc_layout="per-device")


def test_an_eight_gpu_per_device_host_with_sixteen_slots_keeps_all_128_rpc_servers() -> None:
    honest = per_device(8, 16)
    bounded = bound_status(honest, ADDRESS, OWN)
    assert bounded.status == honest and bounded.reason == ""


def test_the_largest_honest_host_fits_and_a_longer_list_is_cut_and_said() -> None:
    # 64 GPUs (the device cap) × 16 slots (--max-rpc-servers at most) is the most an agent runs.
    assert bound_status(per_device(MAX_ITEMS, 16), ADDRESS, OWN).reason == ""
    too_many = per_device(MAX_ITEMS + 1, 16)
    bounded = bound_status(too_many, ADDRESS, OWN)
    assert len(bounded.status.rpc_servers) == MAX_RPC_SERVER_ITEMS == 1024
    assert len(bounded.status.devices) == MAX_ITEMS
    assert bounded.reason == ("agent status clamped: AgentStatus.devices: 65 reported, kept 64; "
                              "AgentStatus.rpc_servers: 1040 reported, kept 1024")
