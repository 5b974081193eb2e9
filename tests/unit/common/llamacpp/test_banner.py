from __future__ import annotations

from llamafleet.common.llamacpp.banner import MIB, BannerDevice, RpcBanner

CURRENT = """Starting RPC server v7.0.0
  endpoint       : 10.0.0.5:50052
  local cache    : /var/cache/llamafleet/rpc
Devices:
  CUDA0: NVIDIA H100 80GB HBM3 (81559 MiB, 81000 MiB free)
  CUDA1: NVIDIA GeForce RTX 3090 (24135 MiB, 23800 MiB free)
  transport      : TCP
"""


def _feed(text: str) -> RpcBanner:
    banner = RpcBanner()
    for line in text.splitlines(keepends=True):
        banner.feed(line)
    return banner


def test_current_banner() -> None:
    banner = _feed(CURRENT)
    assert banner.complete
    assert banner.protocol_version == "7.0.0" and banner.protocol_major == 7
    assert banner.endpoint == "10.0.0.5:50052"
    assert banner.cache_dir == "/var/cache/llamafleet/rpc"
    assert banner.transport == "TCP"
    assert banner.devices == [
        BannerDevice("CUDA0", "NVIDIA H100 80GB HBM3", 81559 * MIB, 81000 * MIB),
        BannerDevice("CUDA1", "NVIDIA GeForce RTX 3090", 24135 * MIB, 23800 * MIB),
    ]


def test_incomplete_until_the_device_list_ends() -> None:
    banner = _feed("\n".join(CURRENT.splitlines()[:5]))
    assert not banner.complete
    banner.feed("  transport      : TCP")
    assert banner.complete


def test_older_banner_without_transport_is_ended_by_the_caller() -> None:
    banner = _feed("Starting RPC server v2.0.0\n  endpoint       : 127.0.0.1:50052\n  local cache    : n/a\nDevices:\n  CPU: AMD EPYC (24105 MiB, 24105 MiB free)\n")
    assert not banner.complete and banner.cache_dir == ""
    banner.end_devices()
    assert banner.complete and banner.protocol_major == 2


def test_noise_and_crlf_are_ignored() -> None:
    banner = _feed("ggml_cuda_init: found 1 CUDA devices:\r\n" + CURRENT.replace("\n", "\r\n") + "Accepted client connection\r\n")
    assert banner.complete and len(banner.devices) == 2
