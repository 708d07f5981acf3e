"""The manual and the README: the site builds with --strict, the README stays short and inside
the repository, every path they name exists, the generated references cover the code, and
every fenced block titled "workstation" runs as written."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
HAS_MKDOCS = all(importlib.util.find_spec(m) is not None for m in ("mkdocs", "material"))

# ```bash title="workstation": quick, safe, runs as written from the repository root
FENCE = re.compile(r'^```bash title="workstation"\n(.*?)^```', re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
OUTPUTS = {"runs", "checkpoints", "data"}  # made by the commands, not in a checkout


def _ignored(path: str) -> bool:
    """A path .gitignore names (`bundles/arm7`, trained by `make demo ROBOT=arm7`): a command's
    output, not part of a checkout."""
    check = ["git", "check-ignore", "--no-index", "-q", path]
    return subprocess.run(check, cwd=ROOT).returncode == 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["NO_MKDOCS_2_WARNING"] = "1"
    return env


@pytest.mark.skipif(not HAS_MKDOCS, reason="mkdocs / mkdocs-material not installed "
                    "(the dev extra has them: pip install -e '.[dev]')")
def test_the_manual_builds_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f",
         str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("reference/config/index.html", "reference/cli/index.html", "index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_readme_is_short_and_opens_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    head = "\n".join(lines[:40])
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "shared/" not in text and "DESIGN.md" not in text, \
        f"{page.name}: points at the design notes outside the repository; copy what is needed"
    for match in LINK.finditer(text):
        target = (match.group(1) or match.group(2)).split("#")[0]
        if not target:
            continue
        if page == README:
            assert "://" not in target, f"README.md links outside the repository: {target}"
        if "://" in target or target.startswith("mailto:"):
            continue
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        if page != README:
            assert resolved.is_relative_to(DOCS), \
                f"{page.name}: {target} is outside docs/ (MkDocs cannot link it: name it as code)"
        generated = resolved.relative_to(ROOT).as_posix() in (
            "docs/reference/config.md", "docs/reference/cli.md")
        assert resolved.exists() or generated, f"{page.name}: {target} does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(page: Path) -> None:
    """`runtime/follower/process.py`, `tests/test_remote.py::test_x`, `bench/results/x.json`:
    every path into the checkout that the text names is there (the layout moves; docs must
    follow)."""
    missing = []
    for span in CODE_SPAN.findall(page.read_text(encoding="utf-8")):
        token = span.split("::")[0].split(":")[0].strip()
        if " " in token or "<" in token or "*" in token or "/" not in token:
            continue
        first = token.split("/")[0]
        if first not in TOP or first in OUTPUTS:
            continue
        if not (ROOT / token).exists() and not _ignored(token):
            missing.append(span)
    assert not missing, f"{page.name} names paths that are not in the checkout: {missing}"


def test_the_generated_references_cover_the_code() -> None:
    sys.path.insert(0, str(DOCS))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(DOCS))
    from runtime.cli import build_parser
    from runtime.config import known_keys

    config = gen_reference.config_reference()
    for key in known_keys():  # a mapping of models is `<name>` in the reference
        key = key.replace("planner.cameras.", "planner.cameras.<name>.")
        assert f"| `{key}` |" in config, f"{key} is missing from the configuration reference"
    cli = gen_reference.cli_reference()
    parser = build_parser()
    stack = [("duet", parser)]
    while stack:
        name, p = stack.pop()
        if name != "duet":
            assert f"`{name}`" in cli, name
        stack += [(f"{name} {sub}", sp) for sub, sp in gen_reference._subparsers(p)]


def _blocks() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for n, match in enumerate(FENCE.finditer(page.read_text(encoding="utf-8"))):
            out.append((f"{page.relative_to(ROOT)}#{n + 1}", match.group(1)))
    return out


def test_there_are_workstation_blocks() -> None:
    assert any(name.startswith("README.md") for name, _ in _blocks())


@pytest.mark.system  # runs `duet` commands in subprocesses
@pytest.mark.parametrize(("name", "script"), _blocks(), ids=[n for n, _ in _blocks()])
def test_workstation_block_runs_as_written(name: str, script: str, tmp_path: Path) -> None:
    """Run from a scratch folder that holds the checkout's folders as links (what a block
    writes, e.g. under runs/, lands in the scratch folder), with the venv's bin on PATH."""
    for entry in ROOT.iterdir():
        if entry.name not in OUTPUTS and not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name} failed:\n{script}\n{proc.stdout}\n{proc.stderr}"


def _tour_block(title: str) -> str:
    found = re.search(rf'^```bash title="tour: {title}"\n(.*?)^```', README.read_text(),
                      re.M | re.S)
    assert found, f"README.md has no block titled 'tour: {title}'"
    return found.group(1)


@pytest.mark.system  # a live sim stack and the `duet` client commands against it
def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    """The five-minute tour, typed as the README has it: the robot block in one shell, each
    line of the second shell's block in another (only `duet top`, a full-screen terminal
    program, is left to tests/test_top.py). Each line's exit code is what its comment says."""
    for entry in ROOT.iterdir():
        if entry.name not in OUTPUTS and not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    env = _env()
    robot = subprocess.Popen(["bash", "-c", _tour_block("the robot")], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)

    def duet(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    try:
        lines = [line.split("  #")[0].strip() for line in
                 _tour_block("a second shell").splitlines()]
        assert lines[0].startswith("export DUET_RUN_DIR=")
        env["DUET_RUN_DIR"] = lines[0].split("=", 1)[1]
        deadline = time.monotonic() + 90  # the stack is up once its follower reports
        while '"mode"' not in duet("duet status --json").stdout:
            assert robot.poll() is None and time.monotonic() < deadline, "the stack never came up"
            time.sleep(0.5)
        modes = []
        for line in lines[1:]:
            if line == "duet top":
                continue
            out = duet(line)
            # status exits 1 when not healthy (a busy test host misses deadlines); the rest 0
            allowed = (0, 1) if line.startswith("duet status") else (0,)
            assert out.returncode in allowed, f"{line}: exit {out.returncode}\n{out.stderr}"
            if line.startswith("duet status"):
                sample = json.loads(duet("duet status --json").stdout)
                modes.append(sample["follower"]["mode"])
        assert modes[-1] == "ESTOP", modes  # `duet status` right after `duet estop`
        after = json.loads(duet("duet status --json").stdout)["follower"]["mode"]
        assert after in ("HOLD", "TRACK"), after  # `duet reset` left ESTOP
    finally:
        os.killpg(robot.pid, signal.SIGINT)  # Ctrl-C in the first shell
        out, _ = robot.communicate(timeout=60)
    assert robot.returncode == 0, out[-3000:]
    assert "duet run" in out  # the summary table


def test_every_config_key_is_described() -> None:
    """Every row of the generated configuration reference says what its key is (a comment
    beside the field in runtime/config/schema.py, or its Field description); the live-tunable
    note the generator adds does not count."""
    sys.path.insert(0, str(DOCS))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(DOCS))

    config = gen_reference.config_reference()
    rows = [line for line in config.splitlines() if line.startswith("| `")]
    assert rows, "no key rows in the configuration reference"
    bare = []
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)  # `\|` inside a cell is escaped
        key, desc = cells[1].strip(), cells[-2].strip()
        desc = desc.replace("**Live tunable** (`duet config set`).", "").strip()
        if not desc:
            bare.append(key)
    assert not bare, f"{len(bare)} config keys have no description: {', '.join(bare)}"
