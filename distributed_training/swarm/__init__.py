"""Everything that speaks hivemind: the DHT and its signed records, progress, the all-reduce.

Only this package imports hivemind, and only `hivemind_private` touches hivemind's private
surface (overridden private methods, private attributes, patches), behind a version check.
"""

from __future__ import annotations

from typing import Any


class HivemindVersionError(RuntimeError):
    """The installed hivemind is not the release `hivemind_private` was written against."""


def base58(peer: Any) -> str:
    """A peer id as text: hivemind's PeerID in base58, anything else as it is."""
    return peer.to_base58() if hasattr(peer, "to_base58") else str(peer)


def by_peer_id(gathered: dict) -> dict[str, Any]:
    """What an all-reduce gathered ({PeerID: data}), keyed by base58 peer id."""
    return {base58(peer): data for peer, data in gathered.items()}


def peer_ids(gathered: dict) -> tuple[str, ...]:
    """The members of an all-reduce, from what it gathered, as sorted base58 ids."""
    return tuple(sorted(by_peer_id(gathered)))
