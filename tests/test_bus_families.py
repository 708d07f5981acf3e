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
    with pytest.raises(ValueError, match=r"'ethercat' \(known: dynamixel, feetech, mit_can\)"):
        family("ethercat")


@pytest.mark.parametrize("config", ["sim.yaml", "so101_sim.yaml", "sim_can.yaml"])
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


def test_feetech_udev_rules_match_the_wch_adapters_and_keep_modemmanager_off() -> None:
    cfg = load_config(REPO / "configs" / "so101_sim.yaml")
    assert cfg.bus is not None
    fam = family_of(cfg.bus)
    [(template, values)] = fam.udev_files(cfg.bus, None).values()
    text = (templates_dir() / template).read_text().format(**values)
    rules = [line for line in text.splitlines() if line.startswith("SUBSYSTEM")]
    products = {line.split('ATTRS{idProduct}=="')[1][:4] for line in rules}
    assert products == {"7523", "55d3", "55d4"}  # CH340, CH343, CH9102
    assert all('ATTRS{idVendor}=="1a86"' in line and 'SYMLINK+="ttyDUET0"' in line
               and 'ENV{ID_MM_DEVICE_IGNORE}="1"' in line for line in rules)
    [(template, values)] = fam.udev_files(cfg.bus, "5A46083062").values()
    pinned = (templates_dir() / template).read_text().format(**values)
    assert [line for line in pinned.splitlines() if line.startswith("SUBSYSTEM")] == [
        'SUBSYSTEM=="tty", ATTRS{serial}=="5A46083062", SYMLINK+="ttyDUET0", GROUP="dialout",'
        ' MODE="0660", ENV{ID_MM_DEVICE_IGNORE}="1"']


def test_feetech_doctor_names_brltty_when_a_ch340_vanished(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "so101_sim.yaml",
                      overrides=["bus.device=" + str(tmp_path / "ttyDUET0")])
    assert cfg.bus is not None
    fam = family_of(cfg.bus)
    sys_root = tmp_path / "sys"
    sys_root.mkdir()
    check = fam.check_device(cfg.bus, installed=True, sys_root=str(sys_root))
    assert check.level == "fail" and "brltty" not in check.detail
    rules = tmp_path / "usr/lib/udev/rules.d/85-brltty.rules"
    rules.parent.mkdir(parents=True)
    rules.write_text('ENV{PRODUCT}=="1a86/7523/*", ENV{BRLTTY_BRAILLE_DRIVER}="bm"\n')
    check = fam.check_device(cfg.bus, installed=True, sys_root=str(sys_root))
    assert check.level == "fail" and "brltty" in check.detail and "apt remove brltty" in check.fix
