"""Devices' one-frame messages, read in one turn of the front-end, taken as one frame set.

A device sends each 32 ms frame as its own AUDIO message on its own connection. A busy
front-end reads many of them per loop turn (FrontEnd.pump_router); taken one by one each costs
it the item-by-item path (StreamTable.audio_item), taken together they cost what a gateway's
message does (engine/frame_sets.py). A quiet front-end reads one message per turn, which then
goes the usual way: collecting adds no wait.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from engine.frame_sets import MIN_ITEMS, Frames, take_frames
from transport import protocol as P

if TYPE_CHECKING:
    from engine.control import StreamTable

# A device's one-frame AUDIO message: header (magic, version, type, request id), one item.
_AUDIO_PREFIX = P.HEADER.pack(P.MAGIC, P.VERSION, P.MsgType.AUDIO, 0)[:4]
_DEVICE_HEAD = struct.Struct("<4xIIIII")  # request_id, stream_id, chunk_seq, dtype, nbytes
_DEVICE_PCM = _DEVICE_HEAD.size


class DeviceFrames:
    """The one-frame messages of one loop turn, collected until the turn ends.

    The front-end offers every message it reads; one that is not a one-frame AUDIO message
    (or differs in dtype or size from those collected) first flushes the collected ones, so
    every client's messages are still handled in the order they arrived.
    """

    def __init__(self, table: StreamTable) -> None:
        self.table = table
        self.identities: list[bytes] = []
        self.messages: list[bytes] = []
        self.shape = (0, 0)  # (dtype, nbytes) of the collected messages

    def offer(self, identity: bytes, msg: bytes) -> bool:
        """Keep ``msg`` for the next flush if it is a device's one-frame AUDIO message."""
        if msg[:4] != _AUDIO_PREFIX or len(msg) <= _DEVICE_PCM:
            return False
        dtype, nbytes = _DEVICE_HEAD.unpack_from(msg)[3:]
        if nbytes != len(msg) - _DEVICE_PCM or (dtype, nbytes) not in self.table.frame_shapes:
            return False
        if (dtype, nbytes) != self.shape:
            self.flush()
            self.shape = (dtype, nbytes)
        self.identities.append(identity)
        self.messages.append(msg)
        return True

    def flush(self) -> None:
        identities, messages = self.identities, self.messages
        if not messages:
            return
        self.identities, self.messages = [], []
        table = self.table
        if len(messages) < MIN_ITEMS:
            for identity, msg in zip(identities, messages):
                table.on_message(identity, msg)
            return
        heads = [_DEVICE_HEAD.unpack_from(msg) for msg in messages]
        dtype, nbytes = self.shape
        pcm = np.frombuffer(b"".join([msg[_DEVICE_PCM:] for msg in messages]), P.NUMPY_DTYPES[P.DType(dtype)])
        ids = [h[1] for h in heads]
        # A stream's second frame in this set needs the first one's context: it waits for the
        # item-by-item path, which runs after the set (and so do any later ones of that stream).
        seen: set[tuple[bytes, int]] = set()
        repeated: set[int] = set()
        for i, key in enumerate(zip(identities, ids)):
            if key in seen:
                repeated.add(i)
            seen.add(key)
        samples = len(pcm) // len(messages)
        get = table.streams.get
        slots = np.array([-1 if (stream := get(key)) is None else stream.slot for key in zip(identities, ids)],
                         np.intp)
        take_frames(table, Frames(identities, [h[0] for h in heads], ids, [h[2] for h in heads],
                                  pcm, samples, samples, dtype, lambda i: (messages[i], _DEVICE_PCM),
                                  frozenset(repeated)), slots)
