"""Does the agent's NVML report match nvidia-smi and the rpc-server banner?

Starts one `llamafleet-agent serve` (adopting the given llama.cpp install, no memory cap),
reads `llamafleet-agent status --json` between two nvidia-smi readings, and compares per GPU:
total and free memory (agent's NVML numbers vs nvidia-smi, in MiB), and the devices the
supervised rpc-server(s) printed in their banners (name, total, free). Free memory moves while
processes start, so the agent's free is compared with the nearer of the two readings.

GPUs are matched by UUID, never by index: the agent pins each rpc-server's GPUs by UUID, so
with several GPUs the banner's CUDAn is the n-th GPU that rpc-server was given (with
`--rpc-layout per-device` every rpc-server's GPU is its CUDA0), not nvidia-smi's index n.

    python bench/gpu/nvml_check.py --llama-cpp DIR --out nvml.json [--rpc-layout shared|per-device]

Nothing here is imported by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from fleet import (
    AgentSpec,
    BenchError,
    LlamaCpp,
    agent_status,
    nvidia_smi,
    start_agent,
    write_token,
)

MIB = 1024 * 1024
TOLERANCE_MIB = 8  # "within a few MiB"


def compare(before: list[dict[str, Any]], status: dict[str, Any], after: list[dict[str, Any]]) -> dict[str, Any]:
    """Per GPU rows of agent vs nvidia-smi vs banner, and whether all are within tolerance."""
    rows = []
    ok = True
    gpus = [d for d in status["devices"] if d.get("kind", "").upper().endswith("GPU")]
    # Slot 0's rpc-servers: one (shared layout) or one per GPU (per-device), all started with the agent.
    servers = [r for r in status.get("rpc_servers") or [status["rpc_server"]] if int(r.get("slot") or 0) == 0]
    banner = [d for r in servers for d in r.get("devices") or [] if d["name"].startswith("CUDA")]
    for smi_before, smi_after in zip(before, after, strict=True):
        index, uuid = smi_before["index"], smi_before.get("uuid", "")
        agent = next((d for d in gpus if uuid and d.get("uuid") == uuid), None)
        cuda = next((d for d in banner if uuid and d.get("uuid") == uuid), None)
        if cuda is None and not any(d.get("uuid") for d in banner):
            # An agent from before the UUID pin: its CUDAn was NVML's index n.
            cuda = next((d for d in banner if d["name"] == f"CUDA{index}"), None)
        row: dict[str, Any] = {"index": index, "smi_name": smi_before["name"], "smi_total_mib": smi_before["total_mib"],
                               "smi_free_mib_before": smi_before["free_mib"], "smi_free_mib_after": smi_after["free_mib"]}
        if agent is None:
            row["problem"] = f"the agent reports no NVML device with UUID {uuid or '?'}"
            ok = False
        else:
            total = int(agent["physical_total_bytes"] or agent["total_bytes"]) / MIB
            free = int(agent["physical_free_bytes"] or agent["free_bytes"]) / MIB
            nearest = min((smi_before["free_mib"], smi_after["free_mib"]), key=lambda f: abs(f - free))
            row |= {
                "agent_name": agent["name"], "agent_total_mib": round(total, 1), "agent_free_mib": round(free, 1),
                "total_diff_mib": round(total - smi_before["total_mib"], 1),
                "free_diff_mib": round(free - nearest, 1),
            }
            row["ok"] = abs(row["total_diff_mib"]) <= TOLERANCE_MIB and abs(row["free_diff_mib"]) <= TOLERANCE_MIB
            ok = ok and row["ok"]
        if cuda is None:
            row["banner_problem"] = f"no rpc-server banner lists GPU {uuid or index}"
            ok = False
        else:
            row |= {"banner_name": cuda["name"], "banner_description": cuda["description"],
                    "banner_endpoint": next(r["endpoint"] for r in servers if cuda in (r.get("devices") or [])),
                    "banner_total_mib": int(cuda["total_bytes"]) // MIB, "banner_free_mib": int(cuda["free_bytes"]) // MIB}
            row["banner_total_diff_mib"] = row["banner_total_mib"] - smi_before["total_mib"]
        rows.append(row)
    return {"ok": ok, "tolerance_mib": TOLERANCE_MIB, "gpu_count": len(before), "rpc_layout": status.get("rpc_layout"),
            "gpus": rows, "banner_devices": banner, "agent_devices": status["devices"],
            "rpc_server": {k: status["rpc_server"].get(k) for k in ("state", "endpoint", "protocol_version", "pid")},
            "build": status.get("build")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="install dir (bin/llama-server, bin/ggml-rpc-server)")
    parser.add_argument("--out", type=Path, required=True, help="JSON result")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rpc-layout", choices=("shared", "per-device"), default="shared",
                        help="the agent's layout: one rpc-server over every GPU, or one per GPU")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nvml-check-"))
    token = write_token(workdir / "token")
    spec = AgentSpec("nvml-agent", 50071, 50072)
    agent = start_agent(spec, LlamaCpp(args.llama_cpp), workdir, token, "", rpc_cache=False, logdir=workdir,
                        extra_args=("--rpc-layout", args.rpc_layout))
    try:
        before = nvidia_smi()
        status = agent_status(spec.address, token)
        after = nvidia_smi()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        agent.stop()
    result = compare(before, status, after)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["gpus"]:
        print(f"GPU {row['index']} {row['smi_name']}: nvidia-smi total {row['smi_total_mib']} MiB, "
              f"free {row['smi_free_mib_before']}→{row['smi_free_mib_after']} MiB; "
              f"agent NVML total {row.get('agent_total_mib')} MiB (diff {row.get('total_diff_mib')}), "
              f"free {row.get('agent_free_mib')} MiB (diff {row.get('free_diff_mib')}); "
              f"banner {row.get('banner_name')} of {row.get('banner_endpoint')} '{row.get('banner_description')}' "
              f"total {row.get('banner_total_mib')} free {row.get('banner_free_mib')} MiB")
    print(f"NVML vs nvidia-smi within {TOLERANCE_MIB} MiB and banner lists every GPU: {'yes' if result['ok'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
