"""The bus-family table (drivers/families.py): every family the config accepts is one entry
that opens its driver, serves its emulator in the sim and renders what install writes."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from drivers.bus_family import resolve
from drivers.families import FAMILIES, family, family_of
from runtime.config import BusConfig, SimConfig, load_config
from runtime.deploy.layout import templates_dir

REPO = Path(__file__).resolve().parents[1]


def test_the_config_schema_and_the_table_name_the_same_families() -> None:
    kinds = {cls.model_fields["kind"].default for cls in typing.get_args(BusConfig)}
    assert kinds == set(FAMILIES)
    transports = set(typing.get_args(SimConfig.model_fields["transport"].annotation))
    assert {f.sim_transport for f in FAMILIES.values()} <= transports


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_each_family_names_a_driver_and_an_emulator_that_exist(kind: str) -> None:
    fam = family(kind)
    driver = resolve(fam.driver)
    assert all(callable(getattr(driver, m, None)) for m in ("from_config", "read", "write"))
    assert callable(resolve(fam.emulator))  # the sim's, by name: drivers never import sim


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'ethercat' \(known: dynamixel, mit_can\)"):
        family("ethercat")


@pytest.mark.parametrize("config", ["sim.yaml", "sim_can.yaml"])
def test_each_family_renders_install_files_from_existing_templates(config: str) -> None:
    cfg = load_config(REPO / "configs" / config)
    assert cfg.bus is not None
    fam = family_of(cfg.bus)
    assert fam.name == cfg.bus.kind
    for serial in (None, "ABC123"):
        files = fam.udev_files(cfg.bus, serial)
        texts = [(templates_dir() / template).read_text().format(**values)
                 for template, values in files.values()]
        assert texts and (serial is None or any(serial in t for t in texts))
    if fam.config_rules is not None:
        template, values = fam.udev_files(cfg.bus, "ABC123")[fam.config_rules]
        text = (templates_dir() / template).read_text().format(**values)
        assert fam.usb_serial_in(text) == "ABC123"
