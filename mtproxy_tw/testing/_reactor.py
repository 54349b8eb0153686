"""
The global reactor, imported only when a double is built without one.
"""

from __future__ import annotations

from typing import Any


def default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor
