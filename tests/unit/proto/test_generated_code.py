"""The committed generated modules are what protoc makes of the .proto, and the contract's rules hold."""

from __future__ import annotations

from llamafleet.proto import regenerate
from llamafleet.proto.v1 import agent_pb2


def test_generated_code_matches_the_proto() -> None:
    assert regenerate.stale_files() == [], "run: python -m llamafleet.proto.regenerate"


def test_enums_start_at_unspecified_zero() -> None:
    for enum in agent_pb2.DESCRIPTOR.enum_types_by_name.values():
        first = enum.values[0]
        assert first.number == 0 and first.name.endswith("_UNSPECIFIED"), enum.name


def test_every_rpc_has_its_own_request_and_response() -> None:
    seen: set[str] = set()
    for method in agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods:
        for message in (method.input_type.name, method.output_type.name):
            assert message not in seen, f"{message} is shared by two RPCs"
            seen.add(message)
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def test_package_is_versioned() -> None:
    assert agent_pb2.DESCRIPTOR.package == "llamafleet.v1"
