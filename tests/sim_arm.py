"""The sim arm as `configs/sim.yaml` defines it: the one place tests take its joints, bus ids
and rates from. A test that copied them would keep passing against a config that moved on.

Helper modules (`onnx_bundle.py`, `byo_policies.py`) import these names at module level, where
a fixture cannot reach; a test reaches them through `conftest.py`'s `sim_config` fixture or
imports them from here."""

from __future__ import annotations

from pathlib import Path

from runtime.config import DuetConfig, DynamixelBusConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SIM_YAML = REPO / "configs" / "sim.yaml"
SIM_CAN_YAML = REPO / "configs" / "sim_can.yaml"

_SIM: DuetConfig = load_config(SIM_YAML)


def sim_config() -> DuetConfig:
    """A fresh copy of the validated sim config (a test may change its copy)."""
    return _SIM.model_copy(deep=True)


assert isinstance(_SIM.bus, DynamixelBusConfig)  # the sim arm: one Dynamixel bus
JOINTS: list[str] = list(_SIM.robot.joints)
N_JOINTS = len(JOINTS)
IDS: list[int] = list(_SIM.bus.ids)
BAUDRATE: int = _SIM.bus.baudrate
