"""
One listening endpoint as a service.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw._twisted import clamp_mss, listen_no_delay

__all__ = ["Listener"]


class Listener(Service):
    """
    Listens on one endpoint from its first start to its stop.

    Twisted's ``StreamServerEndpointService``, but with the two things the
    proxy needs from it public: a refusal to listen that the endpoint
    reports at once is raised at once (so the start fails with it), and
    :attr:`port` fires with the listening port. It listens once, in
    ``privilegedStartService`` (before ``twistd --uid`` drops privileges)
    or, when that was not called, in ``startService``.

    :ivar port: fires with the listening port; ``None`` before the first
        start and after a stop.
    :ivar mss: the TCP MSS announced to clients (``--mss-clamp``), if any.
    """

    log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: Factory, mss: int | None = None
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.mss = mss
        self.port: Deferred[IListeningPort] | None = None
        #: The port, once listening (what callbacks on :attr:`port` return
        #: does not change it).
        self._listening: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listen()

    def startService(self) -> None:
        super().startService()
        self.listen()

    def listen(self) -> None:
        """
        Listen, unless already listening; raise what the endpoint refuses
        with at once (``CannotListenError``).
        """
        if self.port is not None:
            return
        outcome: list[object] = []
        port = self.endpoint.listen(self.factory)

        def now(result: object) -> object:
            outcome.append(result)
            return result

        port.addBoth(now)
        if outcome and isinstance(outcome[0], Failure):
            port.addErrback(lambda _: None)
            outcome[0].raiseException()
        self.port = port.addCallback(self._listened)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self._listening = port
        listen_no_delay(port)  # the clients' sockets start with it: no call each
        if self.mss is not None and not clamp_mss(port, self.mss):
            self.log.warn("--mss-clamp: {port} is not TCP; not clamped", port=port.getHost())
        return port

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        listening, self._listening = self._listening, None
        if listening is not None:
            return listening.stopListening()
        if port is None:
            return None
        port.cancel()  # a listen still under way

        def close(listening: IListeningPort | None) -> Deferred[None] | None:
            # The endpoint could not cancel: the port came up all the same.
            if listening is None:
                return None
            if self._listening is listening:
                self._listening = None
            return listening.stopListening()

        def cancelled(failure: Failure) -> None:
            failure.trap(CancelledError)

        return port.addCallbacks(close, cancelled)
