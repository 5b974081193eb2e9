"""Memory promised to loaded models is not offered twice."""

from __future__ import annotations

from llamafleet.controller.gateway.catalog import parameter_label
from llamafleet.controller.placement.nodes import DeviceView, NodeView

MIB = 2**20


def node(free_mib: int, total_mib: int = 1000) -> NodeView:
    return NodeView("n1:1", "ready", "running", "h:2", "7.0.0", (DeviceView("CPU", total_mib * MIB, free_mib * MIB),))


def test_a_capped_device_that_never_shows_our_use_loses_what_we_placed() -> None:
    # A CPU agent with --memory-limit reports the cap as free whatever we loaded.
    assert node(1000).reserving({("n1:1", "CPU"): 300 * MIB}).devices[0].free_bytes == 700 * MIB


def test_a_report_that_already_shows_our_use_is_not_charged_twice() -> None:
    # NVML's free already fell by the 300 MiB we loaded: min(), not a second subtraction.
    assert node(700).reserving({("n1:1", "CPU"): 300 * MIB}).devices[0].free_bytes == 700 * MIB


def test_reservations_elsewhere_do_not_touch_this_node() -> None:
    assert node(1000).reserving({("n2:1", "CPU"): 999 * MIB}).devices[0].free_bytes == 1000 * MIB
    assert node(100).reserving({("n1:1", "CPU"): 5000 * MIB}).devices[0].free_bytes == 0


def test_parameter_labels_read_like_ollamas() -> None:
    assert parameter_label(268_098_176) == "268M"
    assert parameter_label(8_030_261_248) == "8.0B"
    assert parameter_label(70_553_706_496) == "71B"
