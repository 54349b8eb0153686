"""
What every check reads: the parsed options of ``twist mtproxy``, the
settings they build, and the means to reach out (reactor, HTTP client).
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from mtproxy_tw.middle.fetch import default_http_client
from mtproxy_tw.middle.settings import MiddleSettings
from mtproxy_tw.settings import Settings

__all__ = ["Context", "shared"]


def _limits() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


@dataclass
class Context:
    """
    :ivar options: the resolved options (``mtproxy_tw.tap.Options``).
    :ivar middle: the middle-proxy settings; None in direct mode.
    :ivar timeout: seconds each connection, download or look-up may take.
    :ivar open_file_limits: ``(soft, hard)`` open-file limits; replaceable.
    """

    reactor: Any
    options: Mapping[str, Any]
    settings: Settings
    middle: MiddleSettings | None
    timeout: float
    http_client: Any = None
    open_file_limits: Callable[[], tuple[int, int]] = field(default=_limits)

    def __post_init__(self) -> None:
        if self.http_client is None:
            self.http_client = default_http_client(self.reactor)


def shared(d: Deferred[Any]) -> Deferred[Any]:
    """
    A Deferred that fires with ``d``'s result, leaving ``d`` its result for
    the next one (``d`` must not fail).
    """
    out: Deferred[Any] = Deferred()

    def passed(result: Any) -> Any:
        out.callback(result)
        return result

    d.addCallback(passed)
    return out
