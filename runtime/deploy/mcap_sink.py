"""One MCAP file written in complete chunks: JSON channels with JSON schemas, readable by
the `mcap` CLI, Foxglove and `mcap.reader`.

A chunk is closed and flushed to the OS every `flush_s`, so a SIGKILL or power cut loses at
most that much: every chunk before it is complete on disk (read it back with a
non-seeking reader; the summary section is written only by `close`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mcap.writer import CompressionType, Writer

PROFILE = ""  # no ROS profile: plain JSON messages


@dataclass(frozen=True)
class Record:
    topic: str
    log_time_ns: int  # wall clock at receipt (what MCAP tools show)
    publish_time_ns: int  # sender's monotonic send time (one clock for all duet processes)
    sequence: int
    data: bytes  # JSON


class McapSink:
    def __init__(self, path: Path, schemas: dict[str, tuple[str, dict[str, Any]]],
                 metadata: dict[str, str], flush_s: float = 1.0,
                 chunk_bytes: int = 512 * 1024) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # "x": never clobber an earlier recording; the file lives as long as the sink
        self._file: IO[bytes] = open(path, "xb")  # noqa: SIM115
        self._writer = Writer(self._file, chunk_size=chunk_bytes,
                              compression=CompressionType.ZSTD)
        self._writer.start(profile=PROFILE, library="duet recorder")
        self._writer.add_metadata("duet", metadata)
        self._schemas = schemas  # topic -> (schema name, JSON schema)
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
                topic=topic, message_encoding="json", schema_id=schema_id)
            self._channels[topic] = channel
        return channel

    def write(self, rec: Record) -> None:
        self._writer.add_message(self._channel(rec.topic), log_time=rec.log_time_ns,
                                 data=rec.data, publish_time=rec.publish_time_ns,
                                 sequence=rec.sequence & 0xFFFFFFFF)
        self.messages += 1

    def maybe_flush(self, now_ns: int) -> bool:
        """Close the current chunk when it is older than flush_s (complete on disk)."""
        if now_ns - self._last_flush_ns < self._flush_ns:
            return False
        self._last_flush_ns = now_ns
        self._writer.flush()
        return True

    def size(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        if self.closed:
            return
        self._writer.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.closed = True
