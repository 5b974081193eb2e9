"""Where a model's coordinator (`llama-server`) runs: on the worker with the largest share, or here.

Every share the coordinator does not compute itself costs a network round trip per token (decode
over RPC is bound by round trips: 1.9 ms per token for two hops on an H200). A coordinator on the
worker that holds the largest share computes that share with the worker's own devices, one hop
fewer; the controller's host stays the place when no worker can take it (a worker without the
file, an agent that runs no coordinators) or when the operator says so.

Pure, like the filters: every node that could have run it and did not gets its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llamafleet.controller.placement.plan import Plan

MODES = ("auto", "worker", "controller")  # or a node's address


@dataclass(frozen=True)
class CoordinatorChoice:
    node: str  # "" for the controller's host
    reason: str
    refused: bool = False  # pinned to a worker that cannot take it: the model is not placed


def share_bytes(plan: Plan, node: str) -> int:
    return sum(a.total_bytes for a in plan.assignments if a.node == node)


def why_not_here(plan: Plan, node: str, cannot_host: Mapping[str, str]) -> str:
    """"" when `node` of the plan can run its coordinator, else why not."""
    if node not in plan.holders:
        return "does not hold the model's file"
    if cannot_host.get(node):
        return cannot_host[node]
    share = [a for a in plan.assignments if a.node == node]
    if any(a.device == "CPU" for a in share) and len(share) > 1:
        return "its share mixes GPUs and the CPU"
    if any(a.device != "CPU" and not a.uuid for a in share):
        return "reports no UUID for its GPUs (they cannot be pinned)"
    return ""


def choose_coordinator(plan: Plan, mode: str, cannot_host: Mapping[str, str]) -> CoordinatorChoice:
    """`mode`: auto (the best worker, else here), worker (the best worker, else refuse),
    controller, or a node's address. `cannot_host`: node → why its agent cannot run one ("" if it can)."""
    if mode == "controller" or not plan.fits:
        return CoordinatorChoice("", "pinned to the controller (--coordinator controller)" if plan.fits else "")
    nodes = list(dict.fromkeys(a.node for a in plan.assignments))
    reasons = {node: why_not_here(plan, node, cannot_host) for node in nodes}
    able = [node for node in nodes if not reasons[node]]
    if mode not in ("auto", "worker"):
        if mode not in nodes:
            return CoordinatorChoice("", f"--coordinator {mode}: that node holds no share of this model", refused=True)
        if reasons[mode]:
            return CoordinatorChoice("", f"--coordinator {mode}: that node {reasons[mode]}", refused=True)
        return CoordinatorChoice(mode, f"pinned to {mode} (--coordinator)")
    if not able:
        why = "; ".join(f"{node} {reasons[node]}" for node in nodes)
        if mode == "worker":
            return CoordinatorChoice("", f"no node of the plan can run the coordinator ({why})", refused=True)
        return CoordinatorChoice("", f"on the controller: no node of the plan can run it ({why})")
    # The largest share saves the most; on a tie the later node, which also holds the output layer.
    best = max(able, key=lambda node: (share_bytes(plan, node), nodes.index(node)))
    return CoordinatorChoice(best, f"on {best}: it holds the largest share it can compute itself "
                                   f"({share_bytes(plan, best)} bytes), one network hop fewer per token")
