"""Pick the motor-bus driver the config names (drivers/ stays free of runtime imports)."""

from __future__ import annotations

from drivers.bus import MotorBus
from runtime.config import CanBusConfig, DuetConfig


def open_bus(cfg: DuetConfig) -> MotorBus:
    """Construct (not yet open) the configured bus."""
    if isinstance(cfg.bus, CanBusConfig):
        from drivers.can_mit import MitCanBus

        return MitCanBus.from_config(cfg.bus, list(cfg.robot.joints))
    from drivers.dynamixel import DynamixelBus

    return DynamixelBus.from_config(cfg.bus, list(cfg.robot.joints))
