from pathlib import Path

import pytest
import yaml

from runtime.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SIM = REPO / "configs" / "sim.yaml"


def test_shipped_configs_validate() -> None:
    from runtime.follower.buses import bus_sections

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        sections = bus_sections(cfg)
        assert sorted(n for _, names in sections for n in names) == sorted(cfg.robot.joints)
        assert all(len(bus.ids) == len(names) for bus, names in sections), path


def test_layers_site_then_cli(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("follower: {hz: 250, blend_ms: 40}\n")
    cfg = load_config(SIM, site, ["follower.hz=1000"])
    assert cfg.follower.hz == 1000  # --set beats the site file
    assert cfg.follower.blend_ms == 40  # site beats the robot file
    assert cfg.follower.residual is True  # untouched keys keep the robot file's value


def test_missing_site_file_is_ignored(tmp_path: Path) -> None:
    assert load_config(SIM, tmp_path / "absent.yaml").robot.name


def _bad(tmp_path: Path, mutate) -> str:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(SIM.read_text())
    mutate(data)
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def test_error_names_file_key_and_reason(tmp_path: Path) -> None:
    msg = _bad(tmp_path, lambda d: d["follower"].update(hz=-5))
    assert str(tmp_path / "robot.yaml") in msg
    assert "follower.hz" in msg
    assert "greater than 0" in msg


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    msg = _bad(tmp_path, lambda d: d["follower"].update(blend_msec=5))
    assert "follower.blend_msec" in msg and "Extra inputs" in msg


def test_limits_length_must_match_joints(tmp_path: Path) -> None:
    msg = _bad(tmp_path, lambda d: d["robot"]["limits"].update(velocity_max=[1.0, 2.0]))
    assert "velocity_max has 2 entries" in msg


def test_bus_ids_must_match_joints(tmp_path: Path) -> None:
    msg = _bad(tmp_path, lambda d: d["bus"].update(ids=[1, 2, 3]))
    assert "bus.ids has 3 entries" in msg


def test_error_from_the_site_layer_names_the_site_file(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("follower: {fault_action: explode}\n")
    with pytest.raises(ConfigError) as err:
        load_config(SIM, site)
    assert str(site) in str(err.value) and "follower.fault_action" in str(err.value)


def test_cli_override_errors_name_the_override() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SIM, None, ["follower.hz=fast"])
    assert "--set" in str(err.value) and "follower.hz" in str(err.value)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(SIM, None, ["follower.hz"])


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("robot: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


def test_follower_rate_the_bus_cannot_carry_is_refused_with_the_arithmetic() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SIM, None, ["bus.baudrate=57600", "follower.hz=500"])
    msg = str(err.value)
    assert "bus cannot carry follower.hz=500" in msg and "57600" in msg
    assert "Lower follower.hz to at most" in msg
