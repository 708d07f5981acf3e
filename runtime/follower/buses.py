"""Pick the motor-bus drivers the config names, through the family table (drivers/families.py;
drivers/ stays free of runtime imports)."""

from __future__ import annotations

from drivers.bus import MotorBus
from drivers.families import family_of
from runtime.config import BusConfig, ConfigError, DuetConfig


def bus_sections(cfg: DuetConfig) -> list[tuple[BusConfig, list[str]]]:
    """Each configured bus with the joints it drives (`bus:` is one section of every joint)."""
    if cfg.bus is not None:
        return [(cfg.bus, list(cfg.robot.joints))]
    assert cfg.buses is not None  # the config validator requires one of the two
    return [(bus, list(bus.joints or [])) for bus in cfg.buses]


def single_bus(cfg: DuetConfig, what: str) -> BusConfig:
    """The one bus of a single-bus robot; ConfigError naming `what` for per-limb buses."""
    if cfg.bus is None:
        raise ConfigError(f"{what} handles one motor bus; this config has `buses:` (one per"
                          " limb): set up each adapter by hand (docs/configuration.md, \"One bus"
                          " or several\")")
    return cfg.bus


def _one(bus_cfg: BusConfig, joints: list[str]) -> MotorBus:
    return family_of(bus_cfg).open(bus_cfg, joints)


def open_bus(cfg: DuetConfig) -> MotorBus:
    """Construct (not yet open) the configured bus, or one bus over the per-limb buses."""
    sections = bus_sections(cfg)
    if len(sections) == 1:
        return _one(*sections[0])
    from drivers.multi_bus import MultiBus

    joints = list(cfg.robot.joints)
    return MultiBus(joints, [(_one(b, names), [joints.index(n) for n in names])
                             for b, names in sections])
