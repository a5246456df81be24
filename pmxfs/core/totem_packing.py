"""Packing application messages into frames, and reassembling them from delivered frames.

A frame must fit the network MTU, an application message may be up to MAX_MESSAGE_BYTES. So a
message is cut into fragments of at most `max_fragment` bytes, each carrying (msg_id, index,
count), and the fragments of consecutive messages are packed into frames of at most
`frame_budget` bytes: small messages share a frame, a large one spans many.

A sender's frames are delivered in agreed order and its fragments go out in order, so a receiver
keeps at most one partial message per sender and appends to it. A fragment that does not continue
it (after holes nobody could fill when a ring ended, or from a broken sender) drops the partial
message; so does the end of the ring, after its last frames are delivered. The sender, for its
part, sends a message it had only partly sent again whole, under a new id, in its next ring.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pmxfs.core.errors import LocalError

from .totem_outputs import Counters
from .wire import Fragment

FRAME_OVERHEAD_BYTES = 128
FRAGMENT_OVERHEAD_BYTES = 24
MAX_MESSAGE_BYTES = 16 << 20
DEFAULT_SEND_QUEUE_MESSAGES = 1024
DEFAULT_SEND_QUEUE_BYTES = 32 << 20
MIN_FRAGMENT_BYTES = 256


class MessageTooLarge(LocalError, ValueError):
    """A local caller tried to multicast more than MAX_MESSAGE_BYTES."""


@dataclass(slots=True)
class _Outgoing:
    """An application message waiting to be (fully) multicast."""

    payload: bytes
    msg_id: int  # the id its fragments carry; a new one when it is sent again whole
    count: int  # how many fragments it is cut into
    next_index: int = 0  # the fragment to send next


class SendQueue:
    """The messages accepted for multicast and not yet fully sent, oldest first, bounded in count
    and bytes; `take_frames` packs them into frames as the token allows."""

    def __init__(self, netmtu: int, max_messages: int, max_bytes: int) -> None:
        self.frame_budget = netmtu - FRAME_OVERHEAD_BYTES  # bytes of fragments a frame may hold
        self.max_fragment = self.frame_budget - FRAGMENT_OVERHEAD_BYTES  # data bytes per fragment
        if self.max_fragment < MIN_FRAGMENT_BYTES:
            raise ValueError(f"netmtu {netmtu} is too small")
        self.max_messages = max_messages  # more waiting messages than this: try again
        self.max_bytes = max_bytes  # more waiting payload bytes than this: try again
        self.messages: deque[_Outgoing] = deque()
        self.bytes = 0  # payload bytes of `messages`
        self.last_msg_id = 0  # the id given to the latest message (ids start at 1)

    def __len__(self) -> int:
        return len(self.messages)

    def offer(self, payload: bytes) -> bool:
        """Queue `payload`; False when the queue is full. Raises MessageTooLarge."""
        if len(payload) > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(f"message of {len(payload)} bytes > {MAX_MESSAGE_BYTES}")
        if len(self.messages) >= self.max_messages or self.bytes + len(payload) > self.max_bytes:
            return False
        count = max(1, -(-len(payload) // self.max_fragment))
        self.messages.append(_Outgoing(payload, self._new_msg_id(), count))
        self.bytes += len(payload)
        return True

    def take_frames(self, budget: int) -> list[tuple[Fragment, ...]]:
        """Pack waiting messages into at most `budget` frames, in order; fully packed messages
        leave the queue."""
        frames: list[tuple[Fragment, ...]] = []
        fragments: list[Fragment] = []
        size = 0
        while self.messages and budget > 0:
            head = self.messages[0]
            start = head.next_index * self.max_fragment
            data = head.payload[start:start + self.max_fragment]
            if fragments and size + len(data) + FRAGMENT_OVERHEAD_BYTES > self.frame_budget:
                frames.append(tuple(fragments))
                fragments, size = [], 0
                budget -= 1
                continue
            fragments.append(Fragment(head.msg_id, head.next_index, head.count, data))
            size += len(data) + FRAGMENT_OVERHEAD_BYTES
            head.next_index += 1
            if head.next_index == head.count:
                self.messages.popleft()
                self.bytes -= len(head.payload)
        if fragments:
            frames.append(tuple(fragments))
        return frames

    def restart_partial(self) -> None:
        """A new ring: the message whose first fragments went out in the old one (receivers
        drop them) is sent again whole, under a new id."""
        if self.messages and self.messages[0].next_index:
            self.messages[0].next_index = 0
            self.messages[0].msg_id = self._new_msg_id()

    def _new_msg_id(self) -> int:
        self.last_msg_id += 1
        return self.last_msg_id


@dataclass(slots=True)
class _Partial:
    """The fragments of one sender's message delivered so far."""

    msg_id: int
    next_index: int  # the index the next fragment must have
    size: int = 0  # bytes in `parts`
    parts: list[bytes] = field(default_factory=list)


class Reassembler:
    """Per sender, the message whose fragments are being delivered; `add` gives back a message
    once its last fragment arrives."""

    def __init__(self, counters: Counters) -> None:
        self.partials: dict[int, _Partial] = {}  # sender -> its partial message
        self.counters = counters  # where dropped messages are counted

    def add(self, sender: int, frag: Fragment) -> bytes | None:
        """Take the next delivered fragment of `sender`; the whole message when it completes."""
        if frag.count == 1:
            if self.partials.pop(sender, None) is not None:
                self.counters.add("partial_messages_dropped")
            return frag.data
        partial = self.partials.get(sender)
        if frag.index == 0:
            if partial is not None:
                self.counters.add("partial_messages_dropped")
            partial = self.partials[sender] = _Partial(frag.msg_id, 0)
        elif partial is None or partial.msg_id != frag.msg_id or partial.next_index != frag.index:
            if self.partials.pop(sender, None) is not None:
                self.counters.add("partial_messages_dropped")
            return None
        partial.size += len(frag.data)
        if partial.size > MAX_MESSAGE_BYTES:
            # Only a broken or hostile member sends this; refuse to buffer without bound.
            del self.partials[sender]
            self.counters.add("oversized_messages_dropped")
            return None
        partial.parts.append(frag.data)
        partial.next_index += 1
        if partial.next_index == frag.count:
            del self.partials[sender]
            return b"".join(partial.parts)
        return None

    def drop_partials(self) -> None:
        """The ring ended: no partial message can ever be completed."""
        if self.partials:
            self.counters.add("partial_messages_dropped", len(self.partials))
            self.partials.clear()

    def buffered_bytes(self) -> int:
        return sum(p.size for p in self.partials.values())
