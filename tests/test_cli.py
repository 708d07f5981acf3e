"""The one CLI: help with a description and an example everywhere, --version, did-you-mean,
exit codes (2 bad input, 1 failed check), DUET_CONFIG / DUET_RUN_DIR, config paths relative
to their file."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli import build_parser, main
from runtime.commands.options import subcommands
from runtime.config import load_config

REPO = Path(__file__).resolve().parents[1]


Parsers = list[tuple[str, argparse.ArgumentParser]]


def _leaves(parser: argparse.ArgumentParser, path: str = "") -> Parsers:
    children = subcommands(parser)
    if not children:
        return [(path, parser)]
    out = [(path, parser)] if path else []
    for name, sub in children.items():
        out += _leaves(sub, f"{path} {name}".strip())
    return out


def test_every_subcommand_has_a_description_and_an_example() -> None:
    missing = [name for name, p in _leaves(build_parser())
               if not p.description or "example" not in f"{p.description} {p.epilog}".lower()]
    assert not missing, missing


def test_version_and_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("duet ")
    with pytest.raises(SystemExit) as exc:
        main(["stauts"])
    assert exc.value.code == 2 and "did you mean status?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["config", "vaildate"])
    assert exc.value.code == 2 and "did you mean validate?" in capsys.readouterr().err


@pytest.mark.system
def test_invalid_config_is_exit_2_everywhere(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/sim.yaml").read_text().replace("hz: 500", "hz: -1"))
    for args in (["run", "--config", str(bad), "--duration", "1"],
                 ["config", "validate", "--config", str(bad)],
                 ["follower", "--config", str(bad)], ["sim", "--config", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        assert f"{bad}: follower.hz: Input should be greater than 0" in out.stderr, args


def test_run_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DUET_RUN_DIR", str(tmp_path))
    assert main(["estop", "--json"]) == 1  # nothing running there: NOT STOPPED, exit 1
    out = json.loads(capsys.readouterr().out)
    assert out["stopped"] is False and str(tmp_path) in out["why"]
    assert main(["status", "--json", "--timeout", "0.2"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["healthy"] is False
    # a workstation run dir: no unit to ask systemctl about (tests/test_top.py: each setting)
    assert status["problems"][0]["next"].startswith("is `duet run` running on this run dir")


def test_config_paths_are_relative_to_their_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    robot = tmp_path / "robot" / "arm.yaml"
    robot.parent.mkdir()
    robot.write_text((REPO / "configs/sim.yaml").read_text())
    site = tmp_path / "site" / "site.yaml"
    site.parent.mkdir()
    site.write_text("recorder:\n  dir: recordings\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(robot, site, ["run_dir=runs/x"])
    assert cfg.bundle.path == str(tmp_path / "bundles/reference")  # ../bundles from robot/
    assert cfg.recorder.dir == str(tmp_path / "site/recordings")  # from the site file
    assert cfg.run_dir == str(tmp_path / "runs/x")  # --set: from the working directory
    shipped = load_config(REPO / "configs/sim.yaml")
    assert shipped.bundle.path == str(REPO / "bundles/reference")


def test_run_dir_precedence_for_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.commands.options import process_overrides

    monkeypatch.setenv("DUET_RUN_DIR", "/tmp/env")
    ns = argparse.Namespace
    assert process_overrides(ns(set=[], run_dir=None)) == ["run_dir=/tmp/env"]
    assert process_overrides(ns(set=["run_dir=/tmp/set"], run_dir=None)) == ["run_dir=/tmp/set"]
    assert process_overrides(ns(set=["run_dir=/tmp/set"], run_dir="/tmp/arg"))[-1] == \
        "run_dir=/tmp/arg"


def test_features_register_their_commands_through_entry_points() -> None:
    """Each feature's commands come from the `duet.commands` group (and `bundle create` from
    `duet.bundle_commands`): the runtime lists no workstation package."""
    from importlib.metadata import entry_points

    groups = {ep.name for ep in entry_points(group="duet.commands")}
    assert {"robot", "install", "bundle", "config", "observe", "sim", "policy", "export",
            "dataset"} <= groups
    top = subcommands(build_parser())
    assert {"run", "estop", "install", "sim", "train", "export", "dataset"} <= set(top)
    assert next(iter(top)) == "run"  # the robot's own commands first in `duet --help`
    assert "create" in subcommands(top["bundle"])
    cli_source = (REPO / "runtime" / "cli.py").read_text()
    assert not any(f'"{pkg}.' in cli_source for pkg in ("sim", "policy", "export"))


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback() -> None:
    """`duet record info FILE | head` ended in a BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "config", "show", "--effective", "--config",
         str(REPO / "configs/sim.yaml")], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes a byte: every write meets a closed pipe
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports it
