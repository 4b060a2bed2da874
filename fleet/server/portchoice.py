"""Which client and peer ports an embedded etcd uses, and why not the preferred ones.

An `EmbeddedEtcd` keeps its ports for life once it has been healthy (clients hold its
endpoint), but until then the ports it picked itself ("auto") may change: a preferred
port (2379/2380) can be busy, and a free port can be taken by another process between
`free_port()` and etcd's bind. This class holds that bookkeeping so the process
handling in `embedded.py` only asks "is this port ours to change?" and "pick again".
"""

from __future__ import annotations

from fleet.server.diagnose import busy_note
from fleet.server.ports import _port_is_free, free_port


class PortChoice:
    """The client/peer port pair of one etcd, which of them were auto-chosen, and the
    preferred ports passed over (with who held them) for the start line."""

    def __init__(self, host: str, client_port: int | None, peer_port: int | None) -> None:
        """Take the given ports; pick free ones now (distinct from each other) for None."""
        self.host = host
        self.auto_client = client_port is None
        self.auto_peer = peer_port is None
        self.client = client_port if client_port is not None else free_port(host)
        self.peer = peer_port if peer_port is not None else self._other_port()
        # Ports preferred (2379/2380) but busy, so others were taken, and why (item 14).
        self._preferred: tuple[int | None, int | None] = (None, None)
        self._passed_over: list[int] = []
        self._note: str | None = None

    @property
    def any_auto(self) -> bool:
        """Whether at least one port was auto-chosen (so a lost port race can be retried)."""
        return self.auto_client or self.auto_peer

    @property
    def note(self) -> str | None:
        """Why the preferred ports were not taken; None when they were (or none were
        preferred)."""
        return self._note

    def prefer(self, client: int, peer: int) -> None:
        """Use `client`/`peer` instead of the auto-chosen ports where they are free now.

        They stay "auto": if another process binds one before etcd does, the first
        start falls back to fresh free ports instead of failing. A preferred port that is
        busy is named, with its holder, in `note`.
        """
        self._preferred = (
            client if self.auto_client else None,
            peer if self.auto_peer else None,
        )
        if self.auto_client and client != self.peer and _port_is_free(self.host, client):
            self.client = client
        if self.auto_peer and peer != self.client and _port_is_free(self.host, peer):
            self.peer = peer
        self._note_passed_over()

    def is_auto(self, port: int) -> bool:
        """Whether `port` is one we picked (so another one would do as well)."""
        return (port == self.client and self.auto_client) or (port == self.peer and self.auto_peer)

    def repick(self) -> None:
        """Lost a race for an auto-chosen port: pick fresh free ones for the auto ports."""
        if self.auto_client:
            self.client = free_port(self.host)
        if self.auto_peer:
            self.peer = self._other_port()
        self._note_passed_over()

    def _note_passed_over(self) -> None:
        """Record the preferred ports not in use by us (now taken by someone else)."""
        want_client, want_peer = self._preferred
        missed = [
            port
            for port, have in ((want_client, self.client), (want_peer, self.peer))
            if port is not None and port != have and port not in self._passed_over
        ]
        if missed:
            self._passed_over += missed
            self._note = busy_note(self._passed_over)

    def _other_port(self) -> int:
        """A free port distinct from the client port (the OS may hand the same back)."""
        while True:
            port = free_port(self.host)
            if port != self.client:
                return port
