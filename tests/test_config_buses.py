"""Bus sections of the config: dialects, CAN FD, per-limb buses, motor models, timeouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from drivers.can_mit import MitCanBus
from drivers.multi_bus import MultiBus
from runtime.config import ConfigError, load_config
from runtime.follower.buses import bus_sections, open_bus

REPO = Path(__file__).resolve().parents[1]
CAN = REPO / "configs" / "sim_can.yaml"
FD = REPO / "configs" / "sim_can_fd.yaml"


def load(tmp_path: Path, base: Path, mutate: Any) -> Any:
    data = yaml.safe_load(base.read_text())
    mutate(data)
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def refused(tmp_path: Path, base: Path, mutate: Any) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, base, mutate)
    return str(err.value)


def test_per_limb_buses_build_one_bus_over_both() -> None:
    cfg = load_config(FD)
    sections = bus_sections(cfg)
    assert [names for _, names in sections] == [["base_yaw", "shoulder", "elbow"],
                                                ["wrist_pitch", "wrist_roll", "gripper"]]
    bus = open_bus(cfg)
    assert isinstance(bus, MultiBus) and bus.joint_names == list(cfg.robot.joints)
    parts = bus.parts
    assert all(isinstance(p, MitCanBus) and p.fd and p.dialect.name == "damiao" for p in parts)
    # the wires run side by side: 3 x 2 x 56.8 us each
    assert bus.wire_time_us() == pytest.approx(3 * 2 * 56.8)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(bus=d["buses"][0]), "either `bus`"),
    (lambda d: d.pop("buses"), "neither"),
    (lambda d: d["buses"][1]["joints"].remove("gripper"), "buses: no bus drives gripper"),
    (lambda d: (d["buses"][1]["joints"].remove("gripper"),
                d["buses"][0]["joints"].append("gripper")), "buses.0.ids has 3 entries for 4"),
    (lambda d: d["buses"][1]["joints"].__setitem__(2, "elbow"), "'elbow' is on buses.0 too"),
    (lambda d: d["buses"][1]["joints"].__setitem__(2, "tail"), "'tail' is not in robot.joints"),
    (lambda d: d["buses"][1].pop("joints"), "buses.1.joints: name the joints"),
    (lambda d: d["buses"][1].update(channel=d["buses"][0]["channel"]), "the same wire"),
    (lambda d: (d["follower"].update(hz=1200), d["buses"][1].update(data_bitrate=1000000)),
     "buses.1: bus cannot carry follower.hz=1200: mit_can FD at 1000000/1000000"),
])
def test_bad_per_limb_buses_are_refused(tmp_path: Path, mutate: Any, message: str) -> None:
    assert message in refused(tmp_path, FD, mutate)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["bus"].update(dialect="odrive"), "dialect 'odrive' is not one of generic"),
    (lambda d: d["bus"].update(fd=True), "dialect 'generic' speaks classic CAN only"),
    (lambda d: d["bus"].update(dialect="damiao", fd=True, data_bitrate=500000),
     "data_bitrate 500000 is below bitrate"),
    (lambda d: d["bus"].update(dialect="damiao", ids=[1, 2, 3, 4, 5, 17]), "low 4 bits"),
    (lambda d: d["bus"].update(dialect="myactuator", ids=[1, 2, 3, 4, 5, 33]), "1..32"),
    (lambda d: d["bus"]["model"].update(p_max=float("inf")), "bus.model.p_max"),
    (lambda d: d["bus"]["model"].update(v_max=-1.0), "bus.model.v_max"),
    (lambda d: d["bus"]["model"].update(t_max=0.0), "bus.model.t_max"),
    (lambda d: d["bus"]["model"].update(kp_max=float("nan")), "bus.model.kp_max"),
    (lambda d: d["bus"].update(timeout_ms=float("inf")), "bus.timeout_ms"),
    (lambda d: d["bus"].update(timeout_ms=1e308), "bus.timeout_ms"),
    (lambda d: d["bus"].update(hold_jump_max_rad=float("nan")), "bus.hold_jump_max_rad"),
    (lambda d: d["bus"]["kp"].__setitem__(2, 600.0), "kp[2] = 600.0 is outside [0, 500]"),
    (lambda d: d["bus"]["kd"].__setitem__(0, float("nan")), "bus.kd.0: Input should be a finite"),
    (lambda d: d["bus"]["kd"].pop(), "kd has 5 entries, ids has 6"),
])
def test_bad_can_bus_sections_are_config_errors(tmp_path: Path, mutate: Any,
                                                 message: str) -> None:
    assert message in refused(tmp_path, CAN, mutate)


def test_a_single_bus_may_name_its_joints_in_robot_order(tmp_path: Path) -> None:
    joints = yaml.safe_load(CAN.read_text())["robot"]["joints"]
    cfg = load(tmp_path, CAN, lambda d: d["bus"].update(joints=joints, dialect="damiao"))
    assert bus_sections(cfg)[0][1] == joints
    assert "bus.joints must be robot.joints" in refused(
        tmp_path, CAN, lambda d: d["bus"].update(joints=list(reversed(joints))))
    np.testing.assert_array_equal(open_bus(cfg).kp, cfg.bus.kp)  # type: ignore[attr-defined,union-attr]


SIM = REPO / "configs" / "sim.yaml"


@pytest.mark.parametrize(("base", "mutate", "message"), [
    # two servos on one id: they answer as one (or collide); this passed `config validate`
    # and failed only at start, when the Dynamixel driver refused it
    (SIM, lambda d: d["bus"].update(ids=[1, 2, 3, 4, 5, 5]),
     "bus.ids: Value error, each motor needs its own id; 5 appears more than once"),
    (SIM, lambda d: d["bus"].update(ids=[1, 2, 3, 4, 5, 253]), "bus.ids.5: Input should be"),
    (CAN, lambda d: d["bus"].update(ids=[3, 2, 3, 4, 2, 6]),
     "bus.ids: Value error, each motor needs its own id; 2, 3 appear more than once"),
    (FD, lambda d: d["buses"][1].update(ids=[4, 5, 4]), "buses.1.ids: Value error, each motor"),
])
def test_duplicate_or_unaddressable_motor_ids_are_refused_naming_the_key(
        tmp_path: Path, base: Path, mutate: Any, message: str) -> None:
    assert message in refused(tmp_path, base, mutate)
