"""The installed duet version, for `--version`, summaries and recordings."""

from __future__ import annotations


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("duet-runtime")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: running from a source tree)"
