"""`duet pack`: one archive with everything a robot without network needs, and its reading by
`duet install --offline`.

The archive (tar.gz) holds one folder: `wheels/` (duet's own wheel and a wheel of every robot
dependency, for the target's machine, CPython version and glibc, as `pip download
--only-binary=:all:` resolves them), `bundle/`, `config/duet.yaml`, `source/` (the unit files
and README that install puts in place) and `manifest.json` with the target and the sha256 of
every other file. Reading it is hostile-input work: only plain files and folders, no absolute
or `..` names, bounded count and size, every file listed with a matching hash and nothing
unlisted, the target this machine's own.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from runtime.deploy.steps import InstallError, Runner, external, run_checked
from runtime.model.bundle import load_bundle, sha256_file

FORMAT = 1
MANIFEST = "manifest.json"
MAX_MEMBERS = 20_000
MAX_BYTES = 8 << 30  # unpacked: far above a wheelhouse (~70 MB) + a VLA bundle
MAX_MANIFEST_BYTES = 4 << 20
# What install takes from a source tree: the units, sysusers/tmpfiles and the README.
SOURCE_FILES = ("duet.target", "duet-follower.service", "duet-planner.service",
                "duet-recorder.service", "duet-watch.service", "duet.sysusers.conf",
                "duet.tmpfiles.conf")
MACHINES = ("aarch64", "x86_64")
JETPACK6_GLIBC = "2.35"  # Ubuntu 22.04, what JetPack 6 runs


class ArchiveError(InstallError):
    """An archive that cannot be packed or installed; one line naming it and the fix."""


@dataclass(frozen=True)
class Target:
    machine: str  # aarch64 | x86_64
    python: str  # "3.10"
    glibc: str = JETPACK6_GLIBC  # the newest manylinux the target's glibc runs

    def __post_init__(self) -> None:
        if self.machine not in MACHINES:
            raise ArchiveError(f"--platform {self.machine!r}: one of {', '.join(MACHINES)}")
        if not re.fullmatch(r"3\.\d{1,2}", self.python):
            raise ArchiveError(f"--python {self.python!r}: a CPython version like 3.10")
        if not re.fullmatch(r"2\.(1[7-9]|[2-9]\d)", self.glibc):
            raise ArchiveError(f"--glibc {self.glibc!r}: the target's glibc, 2.17 or newer "
                               f"(JetPack 6: {JETPACK6_GLIBC})")

    @property
    def label(self) -> str:
        return f"{self.machine}-cp{self.python.replace('.', '')}"

    def pip_args(self) -> list[str]:
        """pip's options for wheels that install on the target: every manylinux tag from
        manylinux2014 up to the target's glibc (pip does not widen a PEP 600 tag itself)."""
        newest = int(self.glibc.split(".")[1])
        tags = [f"manylinux2014_{self.machine}"] + [
            f"manylinux_2_{m}_{self.machine}" for m in range(17, newest + 1)]
        return ["--only-binary=:all:", *[a for t in tags for a in ("--platform", t)],
                "--python-version", self.python, "--implementation", "cp"]


def host_target() -> Target:
    libc, version = platform.libc_ver()
    glibc = ".".join(version.split(".")[:2]) if libc == "glibc" and version else "2.17"
    return Target(platform.machine(), f"{sys.version_info.major}.{sys.version_info.minor}",
                  glibc)


# ---------------------------------------------------------------------- pack
def pack(config: Path, bundle: Path | None, target: Target, out: Path, source: Path,
         run: Runner = run_checked, log: Any = print) -> dict[str, Any]:
    """Build the archive at `out`; returns its manifest plus `sha256` of the archive."""
    from runtime.config import load_config
    from runtime.deploy.preflight import sim_problems

    cfg = load_config(config)  # ConfigError: bad input, nothing built
    sim = sim_problems(cfg)
    if sim:
        raise ArchiveError(f"{config} is a simulated robot's config ({'; '.join(sim)}): pack "
                           "the real robot's config")
    if bundle is not None:  # BundleError: refused here, not on the robot
        load_bundle(bundle, cfg.bundle.public_key, list(cfg.robot.joints))
    units = source / "systemd"
    if not all((units / f).is_file() for f in SOURCE_FILES):
        raise ArchiveError(f"duet's unit files are not in {units}: run duet pack from the duet "
                           "source tree, or pass --source DIR")
    with tempfile.TemporaryDirectory(prefix="duet-pack-") as tmp:
        pip = [sys.executable, "-m", "pip"]
        external(run, [*pip, "wheel", "-q", "--no-deps", "-w", tmp, str(source)],
                 "pip's output above says why duet's wheel did not build")
        built = sorted(Path(tmp).glob("duet_runtime-*.whl"))
        if len(built) != 1:
            raise ArchiveError(f"expected one duet_runtime wheel from {source}, got {built}")
        duet_version = built[0].name.split("-")[1]
        name = f"duet-{duet_version}-{target.label}"
        top = Path(tmp) / name
        wheels = top / "wheels"
        wheels.mkdir(parents=True)
        wheel = Path(shutil.move(built[0], wheels / built[0].name))
        external(run, [*pip, "download", "-q", "-d", str(wheels), *target.pip_args(),
                       str(wheel)],
                 f"a robot dependency has no wheel for {target.label} (glibc <= "
                 f"{target.glibc}): pip names it above; pin a version that publishes one")
        for f in SOURCE_FILES:
            _copy(units / f, top / "source" / "systemd" / f)
        _copy(source / "README.md", top / "source" / "README.md")
        _copy(config, top / "config" / "duet.yaml")
        if bundle is not None:
            shutil.copytree(bundle, top / "bundle", symlinks=False)
        files = {str(p.relative_to(top)): sha256_file(p)
                 for p in sorted(top.rglob("*")) if p.is_file()}
        manifest: dict[str, Any] = {
            "format": FORMAT, "duet": duet_version, "created": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": {"machine": target.machine, "python": target.python,
                       "glibc": target.glibc},
            "wheel": f"wheels/{wheel.name}", "config": "config/duet.yaml",
            "bundle": "bundle" if bundle is not None else None,
            "files": files,
        }
        (top / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        with tarfile.open(partial, "w:gz", compresslevel=1) as tar:  # wheels are zips already
            tar.add(top, arcname=name)
        os.replace(partial, out)
    n_wheels = sum(1 for f in files if f.startswith("wheels/"))
    digest = sha256_file(out)
    log(f"packed {out} for {target.label} (glibc <= {target.glibc}): {n_wheels} wheels, "
        f"bundle {'yes' if bundle else 'no'}; sha256 {digest}")
    steps = bootstrap(out.name, name, digest)
    log("on the robot, in the folder you copied it to (no network needed):\n  "
        + "\n  ".join(steps))
    return {**manifest, "archive": str(out), "sha256": digest, "bootstrap": steps}


def bootstrap(archive: str, top: str, digest: str) -> list[str]:
    """The robot's commands for an archive: a duet to install with, from the archive's own
    wheels (no index, no pip configuration), then the install from the archive."""
    wheels = f"/tmp/{top}/wheels"
    return [f"tar -xzf {archive} -C /tmp",
            "python3 -m venv /tmp/duet-bootstrap && /tmp/duet-bootstrap/bin/pip install "
            f"--isolated --no-index --find-links {wheels} duet-runtime",
            f"sudo /tmp/duet-bootstrap/bin/duet install --offline {archive} --sha256 {digest}"]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


# ---------------------------------------------------------------------- unpack
@dataclass(frozen=True)
class Unpacked:
    top: Path
    manifest: dict[str, Any]

    @property
    def wheels(self) -> Path:
        return self.top / "wheels"

    @property
    def wheel(self) -> Path:
        return self.top / self.manifest["wheel"]

    @property
    def config(self) -> Path:
        return self.top / self.manifest["config"]

    @property
    def bundle(self) -> Path | None:
        rel = self.manifest.get("bundle")
        return self.top / rel if rel else None

    @property
    def source(self) -> Path:
        return self.top / "source"


def _member_path(name: str, where: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in name:
        raise ArchiveError(f"{where}: member {name!r} points outside the archive's folder")
    return path


def unpack(archive: Path, dest: Path, expect_sha256: str | None = None,
           check_target: bool = True) -> Unpacked:
    """Verify and unpack a `duet pack` archive into `dest` (an empty folder)."""
    where = str(archive)
    if expect_sha256 is not None and sha256_file(archive) != expect_sha256.lower():
        raise ArchiveError(f"{where}: sha256 is not the expected {expect_sha256}: a different "
                           "or damaged archive; copy it again")
    try:
        with tarfile.open(archive, "r:*") as tar:
            top = _extract(tar, dest, where)
    except (OSError, tarfile.TarError) as exc:
        why = "not a tar archive" if isinstance(exc, tarfile.ReadError) else \
            " ".join(str(exc).split())
        raise ArchiveError(f"{where}: not a readable archive ({why}); make one with duet pack"
                           ) from None
    manifest = _read_manifest(top / MANIFEST, where)
    _verify_files(top, manifest, where)
    got = Unpacked(top, manifest)
    for rel in ("wheel", "config"):
        if not (top / manifest[rel]).is_file():
            raise ArchiveError(f"{where}: manifest.json {rel} {manifest[rel]!r} is missing")
    if check_target:
        t, host = manifest["target"], host_target()
        if (t["machine"], t["python"]) != (host.machine, host.python):
            raise ArchiveError(
                f"{where} was packed for {t['machine']} Python {t['python']}; this machine is "
                f"{host.machine} Python {host.python}: on the workstation run duet pack "
                f"--platform {host.machine} --python {host.python}")
    return got


def _extract(tar: tarfile.TarFile, dest: Path, where: str) -> Path:
    """Plain files and folders only, under one top folder, bounded; modes are ours."""
    tops: set[str] = set()
    total = 0
    try:
        for count, member in enumerate(tar, 1):
            if count > MAX_MEMBERS:
                raise ArchiveError(f"{where}: more than {MAX_MEMBERS} members")
            path = _member_path(member.name, where)
            tops.add(path.parts[0])
            if len(tops) > 1:
                raise ArchiveError(f"{where}: more than one top folder ({', '.join(sorted(tops))})")
            target = dest.joinpath(*path.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                raise ArchiveError(f"{where}: member {member.name!r} is not a plain file "
                                   "(links and devices are refused)")
            total += member.size
            if total > MAX_BYTES:
                raise ArchiveError(f"{where}: more than {MAX_BYTES >> 30} GiB unpacked")
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                raise ArchiveError(f"{where}: member {member.name!r} cannot be read")
            with src, target.open("wb") as f:
                shutil.copyfileobj(src, f)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"{where}: damaged archive ({exc}); copy it again") from None
    if not tops:
        raise ArchiveError(f"{where}: empty archive")
    return dest / tops.pop()


def _read_manifest(path: Path, where: str) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArchiveError(f"{where}: manifest.json is larger than "
                               f"{MAX_MANIFEST_BYTES >> 20} MiB")
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"{where}: manifest.json unreadable ({exc}); not a duet pack "
                           "archive") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise ArchiveError(f"{where}: manifest.json format {fmt!r}, this duet reads "
                           f"{FORMAT}: pack it with this duet version")
    target, files = data.get("target"), data.get("files")
    files = files if isinstance(files, dict) else {}
    ok = (isinstance(target, dict)
          and all(isinstance(target.get(k), str) for k in ("machine", "python", "glibc"))
          and files
          and all(isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                  for k, v in files.items())
          and isinstance(data.get("wheel"), str) and isinstance(data.get("config"), str)
          and data["wheel"].startswith("wheels/") and data["wheel"].endswith(".whl")
          and isinstance(data.get("bundle"), (str, type(None))))
    if not ok:
        raise ArchiveError(f"{where}: manifest.json lacks target, files (name -> sha256), "
                           "wheel or config")
    for rel in (*files, data["wheel"], data["config"], data["bundle"] or "bundle"):
        _member_path(rel, f"{where}: manifest.json")
    return data


def _verify_files(top: Path, manifest: dict[str, Any], where: str) -> None:
    listed: dict[str, str] = manifest["files"]
    present = {str(p.relative_to(top)) for p in top.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        raise ArchiveError(f"{where}: {extra[0]} is not in manifest.json files "
                           f"({len(extra)} such): refusing an archive with unlisted files")
    for rel, want in listed.items():
        path = top / rel
        if not path.is_file():
            raise ArchiveError(f"{where}: {rel} is listed in manifest.json but missing")
        if sha256_file(path) != want:
            raise ArchiveError(f"{where}: {rel} does not match its sha256 in manifest.json "
                               "(damaged or modified): copy the archive again or pack anew")
