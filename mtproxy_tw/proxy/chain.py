"""
The back leg of a direct-mode client when the upstream is another MTProxy
(``--upstream mtproxy://...``): the front connects to the back as a
Telegram app would (:class:`~mtproxy_tw.wire.chain.BackStream`) and relays.

The same interface as :class:`~mtproxy_tw.proxy.dcrelay.DCRelay`. Fast
mode cannot apply across the hop (the back encrypts for the front), so
both directions are decrypted and encrypted again.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.ciphers import CipherContext
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw import _twisted
from mtproxy_tw.connecting import connect_protocol
from mtproxy_tw.proxy.dcrelay import DCClient, DCRelay
from mtproxy_tw.proxy.legs import Leg, close_peer
from mtproxy_tw.wire.chain import BackProxy, BackStream, ChainError, Reframer
from mtproxy_tw.wire.faketls import RecordWriter
from mtproxy_tw.wire.obfuscated2 import AcceptedInit

__all__ = ["ChainRelay", "direct_leg"]


class ChainRelay:
    """
    One client's connection through the back proxy to its DC.
    """

    log = Logger()
    #: Never a splice pump: the front decrypts what the back sends.
    pump: None = None

    def __init__(
        self,
        client: DCClient,
        endpoint: IStreamClientEndpoint,
        init: AcceptedInit,
        back: BackProxy,
        *,
        from_client: CipherContext,
        to_client: CipherContext,
        writer: RecordWriter | None,
        clock: Any,
        timeout: float,
    ) -> None:
        self.client = client
        tag = back.tag_for(init.tag)
        self._stream = BackStream(back, tag, init.dc, clock.seconds())
        self._up_frames = self._down_frames = None
        if tag != init.tag:
            self._up_frames = Reframer(init.tag, tag)
            self._down_frames = Reframer(tag, init.tag, from_back=True)
        self._from_client = from_client
        self._to_client = to_client
        self._writer = writer
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        self._pending: list[bytes] = [self._stream.opening()]
        #: The connection to the back, once up.
        self.leg: Leg | None = None
        self._connected: Leg | None = None
        client.transport.pauseProducing()
        self._connecting: Any = connect_protocol(endpoint, Leg(self))
        self._connecting.addErrback(self._failed)

    # -- the client's bytes

    def _toward_back(self, data: bytes) -> bytes:
        self.client.bytes_in += len(data)
        plain = self._from_client.update(data)
        if self._up_frames is not None:
            plain = self._up_frames.feed(plain)
        return self._stream.outgoing(plain)

    def queue(self, data: bytes) -> None:
        """
        Bytes from the client while the back is not up yet.
        """
        try:
            out = self._toward_back(data)
        except ChainError:
            self._client_broke()
            return
        if out:
            self._pending.append(out)

    def relay(self, data: bytes) -> None:
        """
        Bytes from the client, once the back is up.
        """
        assert self.leg is not None
        try:
            out = self._toward_back(data)
        except ChainError:
            self._client_broke()
            return
        if out:
            _twisted.write(self.leg.transport, out)

    def _client_broke(self) -> None:
        self.client.transport.abortConnection()

    def client_lost(self) -> None:
        self._cancel_timer()
        if self._connecting is not None:
            self._connecting.cancel()
        leg, self.leg = self.leg or self._connected, None
        self._connected = None
        if leg is not None and not leg.lost:
            close_peer(leg.transport, self._clock)
        self._pending = []

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- LegOwner: the back's side

    def leg_connected(self, leg: Leg) -> None:
        self._connecting = None
        if self.client.closed:
            leg.transport.loseConnection()
            return
        self._connected = leg
        transport = leg.transport
        _twisted.no_delay(transport)
        _twisted.set_read_size(transport)
        transport.write(b"".join(self._pending))
        self._pending = []
        if self._stream.up:
            self._up()
        else:
            self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def _up(self) -> None:
        self._cancel_timer()
        leg, client = self._connected, self.client
        assert leg is not None
        self.leg, self._connected = leg, None
        _twisted.set_read_size(client.transport)
        leg.transport.registerProducer(client.transport, True)
        client.transport.registerProducer(leg.transport, True)
        client.dc_up()

    def _timed_out(self) -> None:
        self._timer = None
        self._give_up(Failure(TimeoutError("the back's ServerHello did not come")))

    def _give_up(self, failure: Failure) -> None:
        leg, self._connected = self._connected, None
        if leg is not None:
            leg.transport.abortConnection()
        if not self.client.closed:
            self.client.dc_failed(failure)

    def leg_data(self, data: bytes) -> None:
        client = self.client
        if client.closed or (self.leg is None and self._connected is None):
            return  # the client is gone and the back's close is under way
        try:
            plain, send = self._stream.incoming(data)
            if self._down_frames is not None and plain:
                plain = self._down_frames.feed(plain)
        except ChainError as e:
            self.log.info("the back proxy broke the protocol: {error}", error=str(e))
            if self.leg is None:
                self._give_up(Failure(e))
            else:
                close_peer(self.leg.transport)
            return
        if send:
            leg = self.leg or self._connected
            assert leg is not None
            leg.transport.write(send)
        if self.leg is None and self._connected is not None and self._stream.up:
            self._up()
        if not plain:
            return
        client.bytes_out += len(plain)
        data = self._to_client.update(plain)
        if self._writer is not None:
            data = self._writer.wrap(data, self._clock.seconds())
        _twisted.write(client.transport, data)

    def leg_read_closed(self) -> None:
        pass  # the back's end is a loss

    def leg_lost(self, leg: Leg) -> None:
        if leg is self._connected:  # before it was up
            self._connected = None
            self._cancel_timer()
            if not self.client.closed:
                self.client.dc_failed(Failure(ConnectionError("the back closed")))
            return
        if leg is not self.leg:
            return
        self.leg = None
        if not self.client.closed:
            self.client.transport.unregisterProducer()
            self.client.dc_lost()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self.client.closed:
            return
        self.client.dc_failed(failure)


def direct_leg(
    client: Any, endpoint: IStreamClientEndpoint, init: AcceptedInit, *, back: Any, **relay: Any
) -> DCRelay | ChainRelay:
    """
    The leg of a direct-mode client: to its DC, or through ``back`` (a
    :class:`~mtproxy_tw.wire.chain.BackProxy`) when the upstream is another
    MTProxy (``endpoint``, the DC's, then goes unused).
    """
    if back is None:
        return DCRelay(client, endpoint, init, **relay)
    return ChainRelay(
        client,
        client.core.endpoint(back.address),
        init,
        back,
        from_client=relay["from_client"],
        to_client=relay["to_client"],
        writer=relay["writer"],
        clock=relay["clock"],
        timeout=client.settings.connect_timeout,
    )
