"""The prefill side's pinned transfers: registered, leased by pulls, released exactly once.

A transfer stays pinned until a pull of it is verified by the puller ("pulled"), its timeout
passes ("timeout"), the owner cancels it ("cancelled") or the server closes ("shutdown"). The
owner's callback then frees the blocks. A timeout that fires while a pull is streaming waits for
that pull to end, because the sender is still reading the blocks' memory.
All methods run on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from lightspeed.disagg.transfer_blocks import KvSource
from lightspeed.disagg.transfer_wire import MAX_TRANSFER_ID_CHARS, ReleaseReason, TransferRelease

logger = logging.getLogger(__name__)

ReleaseCallback = Callable[[TransferRelease], None]


@dataclass(eq=False)
class Pinned:
    transfer_id: str
    source: KvSource
    on_release: ReleaseCallback | None
    timer: asyncio.TimerHandle | None = None
    leases: int = 0
    doomed: ReleaseReason | None = None  # set when released while a pull still reads the blocks
    released: bool = False


class TransferRegistry:
    """Transfer id -> pinned source, bounded by `max_pinned`, each expiring after `timeout_s`."""

    def __init__(self, timeout_s: float, max_pinned: int) -> None:
        self._timeout_s = timeout_s
        self._max_pinned = max_pinned
        self._pinned: dict[str, Pinned] = {}

    def __len__(self) -> int:
        return len(self._pinned)

    def add(self, source: KvSource, on_release: ReleaseCallback | None, transfer_id: str | None = None) -> str:
        """Pin `source` under `transfer_id` (default: a fresh unguessable one); RuntimeError when
        `max_pinned` are held, ValueError for an id that is malformed or already pinned."""
        if len(self._pinned) >= self._max_pinned:
            raise RuntimeError(f"{self._max_pinned} KV transfers already pinned (max_pinned)")
        if transfer_id is None:
            transfer_id = secrets.token_urlsafe(16)
        elif not 0 < len(transfer_id) <= MAX_TRANSFER_ID_CHARS:
            raise ValueError(f"transfer_id must have 1..{MAX_TRANSFER_ID_CHARS} characters")
        elif transfer_id in self._pinned:
            raise ValueError(f"transfer_id {transfer_id!r} is already pinned")
        entry = Pinned(transfer_id, source, on_release)
        entry.timer = asyncio.get_running_loop().call_later(self._timeout_s, self._expire, entry)
        self._pinned[transfer_id] = entry
        return transfer_id

    def lease(self, transfer_id: str) -> Pinned | None:
        """The pinned entry for a pull (None if unknown or timed out); pair with `end_lease`."""
        entry = self._pinned.get(transfer_id)
        if entry is None or entry.doomed is not None:
            return None
        entry.leases += 1
        return entry

    def end_lease(self, entry: Pinned, pulled: bool) -> None:
        """A pull ended; a verified one releases the transfer, a failed one leaves it pinned."""
        entry.leases -= 1
        if pulled:
            self._release(entry, "pulled")
        elif entry.doomed is not None and entry.leases == 0:
            self._release(entry, entry.doomed)

    def cancel(self, transfer_id: str) -> bool:
        """Release (the owner gave up on it) once no pull reads it; False if it is not pinned."""
        entry = self._pinned.get(transfer_id)
        if entry is None or entry.doomed is not None:
            return False
        self._retire(entry, "cancelled")
        return True

    def release_all(self) -> None:
        """Release everything now: only once no pull can still be reading (the server closed)."""
        for entry in list(self._pinned.values()):
            self._release(entry, "shutdown")

    def _expire(self, entry: Pinned) -> None:
        if entry.doomed is None:
            self._retire(entry, "timeout")

    def _retire(self, entry: Pinned, reason: ReleaseReason) -> None:
        # The sender may be reading the blocks right now: freeing them under it could send
        # reused memory with a valid checksum, so the release waits for the pull to end.
        if entry.leases == 0:
            self._release(entry, reason)
        else:
            entry.doomed = reason
            logger.info("KV transfer %s %s mid-pull; released when the pull ends", entry.transfer_id, reason)

    def _release(self, entry: Pinned, reason: ReleaseReason) -> None:
        if entry.released:
            return
        entry.released = True
        self._pinned.pop(entry.transfer_id, None)
        if entry.timer is not None:
            entry.timer.cancel()
        logger.debug("KV transfer %s released: %s", entry.transfer_id, reason)
        if entry.on_release is None:
            return
        try:
            entry.on_release(TransferRelease(entry.transfer_id, reason, entry.source.header.num_blocks))
        except Exception:
            # The owner's bug must not take the channel down; it is logged with its traceback.
            logger.exception("KV transfer %s: release callback failed", entry.transfer_id)
