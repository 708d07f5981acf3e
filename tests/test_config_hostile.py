"""Issue 9's config findings: every way a config file or an override can be wrong is a
ConfigError naming the file and the key -- never a traceback, never a number that inverts a
safety clip or overflows the motor path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runtime.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SIM = REPO / "configs/sim.yaml"
SIM_CAN = REPO / "configs/sim_can.yaml"
# 30 levels of aliases each doubling the one before: a few hundred bytes, 2**30 nodes
ALIAS_BOMB = "b0: &b0 [1, 1]\n" + "".join(f"b{i}: &b{i} [*b{i - 1}, *b{i - 1}]\n"
                                         for i in range(1, 30))


def _refused(*sets: str, config: Path = SIM) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(config, None, list(sets))
    return str(err.value)


@pytest.mark.parametrize("value", ["0.0", "-3.0", ".inf", ".nan"])
@pytest.mark.parametrize("key", ["velocity_max", "accel_max"])
def test_limits_must_be_strictly_positive_and_finite(key: str, value: str) -> None:
    """A limit <= 0 inverted the safety filter's clip: a joint told to hold was driven to its
    limit within a second."""
    values = ", ".join(["3.0"] * 5 + [value])
    msg = _refused(f"robot.limits.{key}=[{values}]")
    assert f"--set: robot.limits.{key}.5" in msg


@pytest.mark.parametrize("key", ["follower.blend_ms", "follower.plan_timeout_ms",
                                 "follower.hold_decel", "follower.residual_max",
                                 "follower.residual_filter_ms", "bus.timeout_ms",
                                 "robot.limits.position_max.0"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e308"])
def test_no_infinite_or_absurd_number_reaches_the_motor_path(key: str, value: str) -> None:
    msg = _refused(f"{key}={value}")
    assert key.split(".")[-1] in msg or "position" in msg, msg


@pytest.mark.parametrize("field", ["p_max", "v_max", "t_max", "kp_max", "kd_max"])
@pytest.mark.parametrize("value", ["-.inf", ".inf", "1e308", "0", "-1"])
def test_mit_ranges_must_be_positive_and_finite(field: str, value: str) -> None:
    msg = _refused(f"bus.model.{field}={value}", config=SIM_CAN)
    assert f"bus.model.{field}" in msg, msg


@pytest.mark.parametrize(("text", "reason"), [
    ("robot: {name: 2026-12-01}\n", "date or timestamp"),
    ("follower: {hz: 2026-12-01 10:00:00}\n", "date or timestamp"),
    ("follower: {hz: " + "9" * 5000 + "}\n", "not valid YAML: Exceeds the limit"),
    ("a: " + "[" * 500 + "]" * 500 + "\n", "nested too deeply"),
    (ALIAS_BOMB, "too large or nested too deeply"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("{1: 2}\n", "is not a string"),
    ("a: [unclosed\n", "not valid YAML"),
    ("robot: {name: a\x00b}\n", "not valid YAML: unacceptable character #x0000"),  # atheris
])
def test_hostile_yaml_is_a_config_error_naming_the_file(tmp_path: Path, text: str,
                                                        reason: str) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(text)
    with pytest.raises(ConfigError, match=reason) as err:
        load_config(SIM, site)
    assert str(site) in str(err.value) or "follower.hz" in str(err.value)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_bytes(b"robot:\n  name: \xff\xfe caf\xe9\n")
    with pytest.raises(ConfigError, match=r"site.yaml: not UTF-8 text"):
        load_config(SIM, site)


def test_a_huge_file_is_a_config_error(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("# " + "x" * (2 << 20))
    with pytest.raises(ConfigError, match=r"a config is at most"):
        load_config(SIM, site)


def test_the_shipped_configs_are_valid() -> None:
    for path in (REPO / "configs").glob("*.yaml"):
        assert load_config(path).robot.joints, path
        yaml.safe_load(path.read_text())


# Every YAML tag beyond JSON's types, and every explicitly tagged value PyYAML's constructors
# cannot take: `!!timestamp x` was an AttributeError out of the safe loader, `!!int _` an
# IndexError, `!!bool x` a KeyError; a real date, binary or a set a type the schema never sees.
TAGGED = [("!!timestamp 2026-13", "!!timestamp"), ("!!timestamp 2026-12-01", "!!timestamp"),
          ("2026-12-01 10:00:00", "!!timestamp"), ("!!binary aGk=", "!!binary"),
          ("!!binary '@@'", "!!binary"), ("!!set {a, b}", "!!set"), ("!!omap [a: 1]", "!!omap"),
          ("!!pairs [a: 1]", "!!pairs"), ("!!int _", "not a valid !!int"),
          ("!!float _", "not a valid !!float"), ("!!bool maybe", "not a valid !!bool"),
          ("!!null x", "not a valid !!null"), ("!!str [1]", "!!str on a list"),
          ("!!python/name:os.system x", "!!python/name:os.system"), ("=", "!!value")]


@pytest.mark.parametrize(("value", "reason"), TAGGED)
def test_yaml_tags_are_config_errors_naming_the_key(tmp_path: Path, value: str,
                                                    reason: str) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(f"follower:\n  residual: [1, {{deep: {value}}}]\n")
    with pytest.raises(ConfigError, match=f"{site}: follower.residual\\[1\\].deep: .*{reason}"):
        load_config(SIM, site)
    assert re.search(f"^--set follower.hz: .*{reason}", _refused(f"follower.hz={value}"))


def test_tagged_values_that_fit_their_tag_still_load() -> None:
    cfg = load_config(SIM, None, ["follower.hz=!!float 100", "follower.blend_ms=!!int 0x1F",
                                  "robot.name=!!str 2026-12-01", "sim.enabled=!!bool yes"])
    assert (cfg.follower.hz, cfg.follower.blend_ms, cfg.robot.name) == (100.0, 31, "2026-12-01")


def test_config_validate_refuses_a_tag_with_the_key_and_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "config", "validate",
                           "--config", str(SIM), "--set", "follower.hz=!!timestamp x"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--set follower.hz: !!timestamp" in proc.stderr and "Traceback" not in proc.stderr
