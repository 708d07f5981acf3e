"""Which recordings become dataset episodes: files found under the given paths, read and
checked one by one (a bad file is reported by name and skipped, never the end of the
export), then filtered by name, outcome, start date and alarms.

Data hygiene: a recording in which the follower entered FAULT or ESTOP, and every incident
file (the recorder's ring around such an event), is left out unless `include_incidents`:
a fault is not a demonstration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from runtime.observe.recordings import Recording, RecordingError, read

OUTCOMES = ("success", "fail", "any")


@dataclass
class Selection:
    kept: list[Recording] = field(default_factory=list)
    # (file, why) for every file not exported: unreadable ones and filtered ones
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def bad(self) -> list[tuple[Path, str]]:
        """The files skipped because they could not be read (not merely filtered out)."""
        return [(p, why) for p, why in self.skipped if not why.startswith("filtered:")]


def find_files(paths: list[Path]) -> list[Path]:
    """*.mcap under each folder (recursively) and each file named, sorted, no duplicates."""
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(p for p in path.rglob("*.mcap") if p.is_file())
        elif path.exists():
            found.add(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return sorted(found)


def select(paths: list[Path], names: list[str] | None = None, outcome: str = "any",
           since: datetime | None = None, include_incidents: bool = False) -> Selection:
    """Read every recording under `paths`; keep those that pass the filters, in the order
    they were started (then by file name)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    out = Selection()
    wanted = set(names or [])
    for path in find_files(paths):
        if wanted and path.stem not in wanted:
            continue
        try:
            rec = read(path)
        except RecordingError as exc:
            out.skipped.append((path, str(exc)))
            continue
        except Exception as exc:  # anything else a hostile file provokes: still only this file
            out.skipped.append((path, f"{path}: unreadable ({type(exc).__name__}: {exc})"))
            continue
        why = _filtered(rec, outcome, since, include_incidents)
        if why:
            out.skipped.append((path, f"filtered: {why}"))
        else:
            out.kept.append(rec)
    if wanted:
        missing = wanted - {r.name for r in out.kept} - {p.stem for p, _ in out.skipped}
        out.skipped += [(Path(name), "filtered: no recording of that name") for name in
                        sorted(missing)]
    out.kept.sort(key=lambda r: (r.started.isoformat() if r.started else "", str(r.path)))
    return out


def _filtered(rec: Recording, outcome: str, since: datetime | None,
              include_incidents: bool) -> str | None:
    if not include_incidents and rec.kind == "incident":
        return "an incident recording (use --include-incidents)"
    if not include_incidents and rec.alarm:
        return f"the follower entered {rec.alarm} (use --include-incidents)"
    if outcome != "any" and rec.outcome != outcome:
        return f"outcome {rec.outcome!r}, not {outcome!r}"
    if since is not None and (rec.started is None or rec.started < since):
        return f"started {rec.started.isoformat() if rec.started else 'unknown'}, " \
               f"before {since.isoformat()}"
    if not rec.instruction:
        return "no instruction (the task of an episode)"
    return None
