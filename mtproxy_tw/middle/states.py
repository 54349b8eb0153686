"""
The lifecycle of an RPC connection to a middle proxy, as states and the
moves allowed between them (see :mod:`mtproxy_tw.middle.connection`).
"""

from __future__ import annotations

import enum

__all__ = ["NEXT", "State"]


class State(str, enum.Enum):
    """
    A string enum: a state compares equal to its value (``"ready"``).
    """

    #: TCP connecting, then learning the external address for the keys.
    CONNECTING = "connecting"
    #: Our RPC_NONCE is sent; waiting for the middle proxy's.
    NONCE = "nonce"
    #: Keys set and our RPC_HANDSHAKE sent; waiting for the answer.
    HANDSHAKE = "handshake"
    #: Carrying clients.
    READY = "ready"
    #: Aborted by us or lost; nothing more is read or sent.
    CLOSED = "closed"


NEXT = {
    State.CONNECTING: {State.NONCE, State.CLOSED},
    State.NONCE: {State.HANDSHAKE, State.CLOSED},
    State.HANDSHAKE: {State.READY, State.CLOSED},
    State.READY: {State.CLOSED},
    State.CLOSED: set(),
}
