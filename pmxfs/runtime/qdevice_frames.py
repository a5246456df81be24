"""Sending and receiving qdevice_wire messages on a trio stream -- both ends use these.

A frame is a 4-byte big-endian length then the body (core/qdevice_wire.py). `receive_message`
reads the header, refuses an oversized length before reading the body (`frame_length`) and
decodes it (`decode`): any breach of the protocol is a `ProtocolError`, a peer that closes
mid-frame or before one a `ConnectionClosed` (`clean` tells which). Neither bounds time: the
caller wraps them in its deadline.
"""

from __future__ import annotations

import trio

from pmxfs.core.qdevice_wire import LENGTH, Message, decode, encode, frame_length


class ConnectionClosed(Exception):
    """The peer closed the connection; `clean` when it did so between two frames."""

    def __init__(self, clean: bool) -> None:
        super().__init__("connection closed" if clean else "connection closed inside a frame")
        self.clean = clean


async def receive_message(stream: trio.abc.ReceiveStream) -> Message:
    """The next message; ProtocolError for a bad frame, ConnectionClosed at the end."""
    header = await _receive_exactly(stream, LENGTH.size, first=True)
    return decode(await _receive_exactly(stream, frame_length(header), first=False))


async def send_message(stream: trio.abc.SendStream, message: Message) -> None:
    await stream.send_all(encode(message))


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int, *, first: bool) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise ConnectionClosed(clean=first and not data)
        data += chunk
    return bytes(data)
