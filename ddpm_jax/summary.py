"""A minimal TensorBoard scalar writer that does not need TensorFlow.

Writes ``events.out.tfevents.*`` files: TFRecord framing (length, masked
CRC-32C of the length, the record, masked CRC-32C of the record) around
hand-encoded ``tensorflow.Event`` protocol buffers holding ``simple_value``
scalars, which TensorBoard reads like those of ``tf.summary.scalar``.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE: list[int] = []


def _crc_table() -> list[int]:
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    return _CRC_TABLE


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of data."""
    table = _crc_table()
    c = 0xFFFFFFFF
    for byte in data:
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int, *, summary: bytes | None = None,
           file_version: str | None = None) -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if summary is not None:
        msg += _bytes_field(5, summary)
    return msg


def _scalar_summary(values: dict[str, float]) -> bytes:
    out = b""
    for tag, value in values.items():
        val = _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))
        out += _bytes_field(1, val)
    return out


class SummaryWriter:
    """Appends scalar summaries to one event file in logdir."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")  # closed in close()
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes the scalars at step and flushes."""
        self._write(_event(time.time(), int(step), summary=_scalar_summary(values)))
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
