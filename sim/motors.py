"""The motor models the sim emulates, by name (`sim.robot.motors[i].model` in a config).

A model is what the physics needs of one motor: the torque it saturates at, the gains of its
on-board position loop (serial servos; an MIT-mode motor takes kp/kd with every command), the
play of its gear train and a first-order thermal model. Figures are from the makers' public
data sheets where they publish them (torque, speed, temperature limit) and estimates where they
do not (thermal constants, Feetech's gain map): an estimate is marked as one. A config can
override any figure per joint (runtime/config/schema.py `SimMotorConfig`).

Thermal model (per joint, each physics step): dT/dt = (T_ambient + heat_rise_c (tau /
torque_max)^2 - T) / heat_tau_s, i.e. copper losses against one thermal resistance and mass.
Above temperature_limit_c the motor latches an overheating error and lets go, as the real
ones do (Dynamixel "Shutdown", Feetech's protection, Damiao's over-temperature code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drivers import feetech_protocol as ft
from sim.dynamixel_emulator import XM430_W350, XM540_W270, ServoModel, position_gains_si
from sim.feetech_emulator import position_gains_si as feetech_gains

AMBIENT_C = 30.0  # °C, what every motor reads at power-on


@dataclass(frozen=True)
class MotorModel:
    name: str
    family: str  # the bus kind that speaks to it (drivers/families.py)
    torque_max: float  # N·m: stall torque (servos) or peak torque (MIT motors)
    no_load_rad_s: float  # rad/s at the output, at the rated voltage
    kp: float  # N·m/rad, factory position-mode gain (0: the bus sends its own)
    kd: float  # N·m·s/rad, factory position-mode damping (back-EMF included)
    backlash: float  # rad, total play of the gear train
    heat_rise_c: float  # K above ambient at continuous torque_max
    heat_tau_s: float  # s, thermal time constant
    temperature_limit_c: float  # °C, overheating shutdown


def _dynamixel(servo: ServoModel) -> MotorModel:
    # Factory gains: Position P Gain 800, D 0, through the e-manual's PWM map
    # (sim/dynamixel_emulator.py). The shipped arm keeps an ideal gear train (backlash 0):
    # its reference follower was trained on that; a config sets `backlash` per joint.
    kp, kd = position_gains_si(800, 0, servo)
    return MotorModel(servo.name, "dynamixel", servo.stall_torque_nm,
                      servo.no_load_rpm * 2 * math.pi / 60, kp, kd, backlash=0.0,
                      heat_rise_c=150.0, heat_tau_s=300.0,  # estimates
                      temperature_limit_c=80.0)  # Temperature Limit, factory default


# Feetech STS3215 at 7.4 V (the SO-100/SO-101 servo): 19.5 kg·cm stall, 45 rpm no load, its
# factory P/D coefficients (32/32) through the emulator's gain map (sim/feetech_emulator.py: an
# estimate, Feetech does not publish its controller's scaling), 70 °C Max Temperature. Backlash
# ~0.3° (hobby-grade steel gears, an estimate).
_STS_KP, _STS_KD = feetech_gains(32, 32, ft.STS3215)
_STS3215 = MotorModel("STS3215", "feetech", ft.STS3215.stall_torque_nm,
                      ft.STS3215.no_load_rpm * 2 * math.pi / 60, _STS_KP, _STS_KD,
                      backlash=0.005, heat_rise_c=120.0, heat_tau_s=200.0,  # estimates
                      temperature_limit_c=70.0)

# Damiao MIT-mode joint motors (24 V): J4310-2EC 7 N·m peak, 200 rpm no load (10:1); J4340-2EC
# 27 N·m peak, 52 rpm no load (40:1). The bus sends kp/kd; no factory position loop.
_DM_J4310 = MotorModel("DM-J4310-2EC", "mit_can", 7.0, 200 * 2 * math.pi / 60, kp=0.0, kd=0.0,
                       backlash=0.002, heat_rise_c=400.0, heat_tau_s=120.0,
                       temperature_limit_c=100.0)
_DM_J4340 = MotorModel("DM-J4340-2EC", "mit_can", 27.0, 52 * 2 * math.pi / 60, kp=0.0, kd=0.0,
                       backlash=0.002, heat_rise_c=400.0, heat_tau_s=180.0,
                       temperature_limit_c=100.0)

MOTORS: dict[str, MotorModel] = {m.name: m for m in (
    _dynamixel(XM430_W350), _dynamixel(XM540_W270), _STS3215, _DM_J4310, _DM_J4340)}

# The model a joint gets when the config names none: the family's usual servo.
FAMILY_DEFAULT = {"dynamixel": "XM430-W350", "feetech": "STS3215", "mit_can": "DM-J4310-2EC"}


def motor_model(name: str) -> MotorModel:
    """The model called `name`; KeyError naming the known ones."""
    try:
        return MOTORS[name]
    except KeyError:
        raise KeyError(f"unknown motor model {name!r} (known: {', '.join(MOTORS)})") from None
