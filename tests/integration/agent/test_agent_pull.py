"""PrepareModelPush / PushModel on a real agent process: what it takes, what it refuses, and with which code."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.node_auth import make_proof
from llamafleet.controller.credentials import method_path
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import RunningAgent, running_agent

pytestmark = pytest.mark.integration
PAYLOAD = hashlib.sha256(b"seed").digest() * (96 * 1024)  # 3 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MIB = 1024 * 1024


class Pusher:
    """Pushes as the controller does: the header, the agent's answer, and the bytes only once it accepted."""

    def __init__(self, agent: RunningAgent) -> None:
        self.agent = agent
        self.sent = 0  # data messages the last push sent

    def __call__(self, header: pb.PushModelHeader, data: bytes, metadata: list[tuple[str, str]] | None = None,
                 first: pb.PushModelRequest | None = None) -> pb.PushModelDone:
        answered = threading.Event()
        accepted: list[bool] = []
        self.sent = 0

        def messages() -> Iterator[pb.PushModelRequest]:
            yield first or pb.PushModelRequest(header=header)
            answered.wait(30)
            for start in range(0, len(data), MIB) if accepted else ():
                self.sent += 1
                yield pb.PushModelRequest(data=data[start:start + MIB])

        answers = self.agent.stub.PushModel(messages(), metadata=self.agent.metadata if metadata is None else metadata,
                                            timeout=30)
        try:
            answer = next(answers)
            if answer.WhichOneof("event") == "done":
                return answer.done
            assert answer.accepted.offset == header.offset
            accepted.append(True)
        finally:
            answered.set()
        done: pb.PushModelDone = next(answers).done
        return done


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    return error.value


def details(error: grpc.RpcError) -> str:
    text = error.details()
    assert text is not None, f"{error.code()} without a message"
    return text


def test_a_push_lands_ready_and_every_refusal_is_one_line_with_its_code(tmp_path: Path, llama_cpp: Manifest) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with running_agent(tmp_path / "agent", llama_cpp.install_dir,
                       extra_args=("--models-dir", str(store), "--no-rpc-autostart")) as agent:
        header = pb.PushModelHeader(name="tiny/model", sha256=SHA, size_bytes=len(PAYLOAD))
        push = Pusher(agent)

        # Every call needs the node credential: a client stream is refused before it is read.
        for metadata in ([], [("authorization", "Bearer wrong")],
                         [("authorization", make_proof(agent.token, method_path("PrepareModelPush")))]):
            error = refused(lambda: push(header, PAYLOAD, metadata))  # noqa: B023
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            assert push.sent == 0
        assert list(store.iterdir()) == []

        # Names outside the index's grammar, bad digests and sizes: INVALID_ARGUMENT, before anything.
        for name in ("../escape", "/etc/passwd", ".hidden", "a/b/c", "a..b"):
            bad = pb.PrepareModelPushRequest(name=name, sha256=SHA, size_bytes=len(PAYLOAD))
            error = refused(lambda: agent.stub.PrepareModelPush(bad, metadata=agent.metadata, timeout=10))  # noqa: B023
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid model file name" in details(error)
            error = refused(lambda: push(pb.PushModelHeader(name=name, sha256=SHA, size_bytes=len(PAYLOAD)),  # noqa: B023
                                         PAYLOAD))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and push.sent == 0  # refused before any byte
        error = refused(lambda: agent.stub.PrepareModelPush(pb.PrepareModelPushRequest(name="x", sha256="abc",
                                                                                       size_bytes=1),
                                                            metadata=agent.metadata, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256 must be 64" in details(error)
        error = refused(lambda: push(header, PAYLOAD, first=pb.PushModelRequest(data=b"no header")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be the header" in details(error)

        # More than the disk holds (the real statvfs of the store): RESOURCE_EXHAUSTED, naming both.
        huge = pb.PrepareModelPushRequest(name="huge", sha256=SHA, size_bytes=2**50)
        error = refused(lambda: agent.stub.PrepareModelPush(huge, metadata=agent.metadata, timeout=10))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(error).startswith(f"not enough disk space for huge in {store}: needs 1024.0 TiB, ")
        assert details(error).endswith(" free") and "\n" not in details(error)

        # Bytes that are not the file announced: DATA_LOSS, and nothing usable is left.
        error = refused(lambda: push(header, PAYLOAD[:-1] + b"\x00"))
        assert error.code() == grpc.StatusCode.DATA_LOSS and "nothing was kept" in details(error)
        assert [p.name for p in store.rglob("*") if p.is_file()] == []
        assert agent.status().models == []

        # The right bytes: verified, in place and listed READY in the very next status.
        prepared = agent.stub.PrepareModelPush(pb.PrepareModelPushRequest(name="tiny/model", sha256=SHA,
                                                                          size_bytes=len(PAYLOAD)),
                                               metadata=agent.metadata, timeout=10)
        assert (prepared.have_bytes, prepared.already_held) == (0, False) and prepared.free_bytes > len(PAYLOAD)
        reply = push(header, PAYLOAD)
        assert (reply.received_bytes, reply.already_held) == (len(PAYLOAD), False) and push.sent == 3
        assert (reply.model.name, reply.model.sha256, reply.model.state) == ("tiny/model", SHA,
                                                                             pb.MODEL_FILE_STATE_READY)
        assert (store / "tiny" / "model.gguf").read_bytes() == PAYLOAD
        assert [(m.name, m.state) for m in agent.status().models] == [("tiny/model", pb.MODEL_FILE_STATE_READY)]
        again = agent.stub.PrepareModelPush(pb.PrepareModelPushRequest(name="other", sha256=SHA,
                                                                       size_bytes=len(PAYLOAD)),
                                            metadata=agent.metadata, timeout=10)
        assert again.already_held and again.model.name == "tiny/model"
        # A different file under a name that is taken is refused; the file there is kept.
        other = pb.PrepareModelPushRequest(name="tiny/model", sha256="0" * 64, size_bytes=10)
        error = refused(lambda: agent.stub.PrepareModelPush(other, metadata=agent.metadata, timeout=10))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "already holds another file" in details(error)
        error = refused(lambda: push(pb.PushModelHeader(name="tiny/model", sha256="0" * 64, size_bytes=10),
                                     b"0123456789"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and push.sent == 0
        # Held already (under another name): the answer is `done` at once, and nothing is sent.
        held = push(pb.PushModelHeader(name="again", sha256=SHA, size_bytes=len(PAYLOAD)), PAYLOAD)
        assert held.already_held and held.model.name == "tiny/model" and push.sent == 0


def test_an_agent_without_a_models_dir_refuses_a_push(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir, extra_args=("--no-rpc-autostart",)) as agent:
        request = pb.PrepareModelPushRequest(name="gemma", sha256=SHA, size_bytes=len(PAYLOAD))
        for call in (lambda: agent.stub.PrepareModelPush(request, metadata=agent.metadata, timeout=10),
                     lambda: Pusher(agent)(pb.PushModelHeader(name="gemma", sha256=SHA, size_bytes=len(PAYLOAD)),
                                           PAYLOAD)):
            error = refused(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error.details() == "this agent has no models dir (--models-dir): it has nowhere to keep model files"
