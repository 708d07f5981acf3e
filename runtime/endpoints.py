"""ZeroMQ endpoints, all ipc:// sockets in the runtime directory (DESIGN.md)."""

from __future__ import annotations

from pathlib import Path


def _ipc(run_dir: str, name: str) -> str:
    return f"ipc://{Path(run_dir) / name}"


def plan(run_dir: str) -> str:
    return _ipc(run_dir, "plan")


def state(run_dir: str) -> str:
    return _ipc(run_dir, "state")


def control(run_dir: str) -> str:
    return _ipc(run_dir, "control")


def telemetry(run_dir: str, source: str) -> str:
    return _ipc(run_dir, f"telemetry-{source}")


def sim(run_dir: str) -> str:
    """Sim camera frames (and task announcements)."""
    return _ipc(run_dir, "sim")


def sim_control(run_dir: str) -> str:
    """The sim robot's fault-injection socket (sim/faults.py)."""
    return _ipc(run_dir, "sim-control")
