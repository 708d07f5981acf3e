"""One MCAP file written in complete chunks: JSON channels with JSON schemas, readable by
the `mcap` CLI, Foxglove and `mcap.reader`.

A chunk is closed and flushed to the OS every `flush_s`, so a SIGKILL or power cut loses at
most that much: every chunk before it is complete on disk (read it back with a
non-seeking reader; the summary section is written only by `close`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mcap.writer import CompressionType, Writer

from runtime.observe.channels import Record

PROFILE = ""  # no ROS profile: plain JSON messages


class McapSink:
    def __init__(self, path: Path, schemas: dict[str, tuple[str, dict[str, Any]]],
                 metadata: dict[str, str], flush_s: float = 1.0,
                 chunk_bytes: int = 512 * 1024,
                 channel_metadata: dict[str, str] | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # "x": never clobber an earlier recording; the file lives as long as the sink
        self._file: IO[bytes] = open(path, "xb")  # noqa: SIM115
        self._writer = Writer(self._file, chunk_size=chunk_bytes,
                              compression=CompressionType.ZSTD)
        self._writer.start(profile=PROFILE, library="duet recorder")
        self._writer.add_metadata("duet", metadata)
        self._schemas = schemas  # topic -> (schema name, JSON schema)
        self._channel_metadata = channel_metadata or {}
        self._channels: dict[str, int] = {}
        self._flush_ns = int(flush_s * 1e9)
        self._last_flush_ns = 0
        self.messages = 0
        self.closed = False

    def _channel(self, topic: str) -> int:
        channel = self._channels.get(topic)
        if channel is None:
            name, schema = self._schemas[topic]
            schema_id = self._writer.register_schema(
                name=name, encoding="jsonschema", data=json.dumps(schema).encode())
            channel = self._writer.register_channel(
                topic=topic, message_encoding="json", schema_id=schema_id,
                metadata=self._channel_metadata)
            self._channels[topic] = channel
        return channel

    def write(self, rec: Record) -> None:
        self._writer.add_message(self._channel(rec.topic), log_time=rec.log_time_ns,
                                 data=rec.data, publish_time=rec.log_time_ns,
                                 sequence=rec.sequence & 0xFFFFFFFF)
        self.messages += 1

    def add_metadata(self, name: str, data: dict[str, str]) -> None:
        """A metadata record (e.g. an episode's outcome, known only at its end)."""
        self._writer.add_metadata(name, data)

    def maybe_flush(self, now_ns: int) -> bool:
        """Close the current chunk when it is older than flush_s (complete on disk)."""
        if now_ns - self._last_flush_ns < self._flush_ns:
            return False
        self._last_flush_ns = now_ns
        self._writer.flush()
        return True

    def size(self) -> int:
        return self._file.tell()

    def abandon(self) -> None:
        """Stop writing after a failed write: the complete chunks stay readable (no footer)."""
        self.closed = True
        try:
            self._file.close()
        except OSError:
            pass

    def close(self) -> None:
        if self.closed:
            return
        self._writer.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.closed = True


@dataclass
class Contents:
    """What could be read back from a (possibly cut-off) recording."""

    messages: list[tuple[str, str, int, bytes]]  # (topic, schema name, log_time_ns, data)
    complete: bool  # the file was closed cleanly (summary and footer present)
    error: str | None  # why reading stopped early, for a cut-off file
    metadata: dict[str, dict[str, str]]  # name -> the last metadata record of that name


def read_recording(path: Path) -> Contents:
    """Every message in complete chunks, in file order; a file cut off by SIGKILL or power
    loss yields what was flushed before it (no summary section is needed)."""
    from mcap.exceptions import McapError
    from mcap.reader import NonSeekingReader
    from mcap.records import Footer, Metadata
    from mcap.stream_reader import StreamReader

    out: list[tuple[str, str, int, bytes]] = []
    error = None
    with open(path, "rb") as f:
        reader = NonSeekingReader(f)
        try:
            for schema, channel, message in reader.iter_messages(log_time_order=False):
                out.append((channel.topic, schema.name if schema else "", message.log_time,
                            message.data))
        except (McapError, EOFError, ValueError, struct.error) as exc:
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    complete = False
    metadata: dict[str, dict[str, str]] = {}
    with open(path, "rb") as f:
        try:
            for record in StreamReader(f).records:
                if isinstance(record, Metadata):
                    metadata[record.name] = dict(record.metadata)
                complete = complete or isinstance(record, Footer)
        except (McapError, EOFError, ValueError, struct.error):
            complete = False
    return Contents(out, complete and error is None, error, metadata)


def summarize_recording(path: Path) -> dict[str, Any]:
    """What `duet record info` shows: metadata, channels with counts, span, completeness."""
    from collections import Counter
    from datetime import datetime, timezone

    contents = read_recording(path)
    counts = Counter((topic, schema) for topic, schema, *_ in contents.messages)
    times = [t for _, _, t, _ in contents.messages]

    def iso(ns: int) -> str:
        return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="milliseconds")

    return {"file": str(path), "metadata": contents.metadata,
            "topics": [{"topic": t, "schema": s, "messages": n}
                       for (t, s), n in sorted(counts.items())],
            "messages": len(times), "duration_s": (max(times) - min(times)) / 1e9 if times
            else 0.0, "start": iso(min(times)) if times else None,
            "end": iso(max(times)) if times else None,
            "state": "complete" if contents.complete else
            f"cut off ({contents.error or 'no footer'}); complete chunks read"}
