"""
The client connection's lifecycle, as states and the moves allowed between
them (see :mod:`mtproxy_tw.proxy.client`).
"""

from __future__ import annotations

import enum

__all__ = ["NEXT", "State"]


class State(enum.Enum):
    HANDSHAKING = "handshaking"
    CONNECTING = "connecting to the DC"
    RELAYING = "relaying"
    FRONTING = "fronting"
    DRAINING = "draining"
    CLOSED = "closed"


NEXT = {
    State.HANDSHAKING: {
        State.CONNECTING,
        State.RELAYING,
        State.FRONTING,
        State.DRAINING,
        State.CLOSED,
    },
    State.CONNECTING: {State.RELAYING, State.DRAINING, State.CLOSED},
    State.RELAYING: {State.DRAINING, State.CLOSED},
    State.FRONTING: {State.DRAINING, State.CLOSED},
    State.DRAINING: {State.CLOSED},
    State.CLOSED: set(),
}
