"""
The DC leg of a direct-mode client: the proxy's own obfuscated2 connection
to the data centre, and the two AES-CTR streams either side of it.

Like the front leg (:mod:`mtproxy_tw.fronting.relay`) and a middle-proxy
session, it pauses the client until it is up, makes each transport the
other's producer, and closes the client when the DC goes.
"""

from __future__ import annotations

from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers import CipherContext
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from mtproxy_tw import _twisted
from mtproxy_tw.connecting import connect_protocol
from mtproxy_tw.proxy.legs import Leg, LegClient, close_peer
from mtproxy_tw.proxy.splice import Pump, start_pump
from mtproxy_tw.wire import obfuscated2
from mtproxy_tw.wire.faketls import RecordWriter
from mtproxy_tw.wire.obfuscated2 import AcceptedInit

__all__ = ["DCClient", "DCRelay"]


class DCClient(LegClient, Protocol):
    """
    What the DC leg uses of the client protocol.
    """

    def dc_up(self) -> None: ...
    def dc_lost(self) -> None: ...
    def dc_failed(self, failure: Failure) -> None: ...


class DCRelay:
    """
    One client's connection to its DC.

    In fast mode the DC was handed the proxy's key toward the client, so
    what it sends is passed on as it is (wrapped in TLS records for a
    fake-TLS client); otherwise it is decrypted and encrypted again. A
    copy between two plain TCP connections is spliced (:mod:`.splice`)
    unless ``splice`` is off.
    """

    __slots__ = (
        "_clock",
        "_connecting",
        "_from_client",
        "_from_dc",
        "_pending",
        "_splice",
        "_to_client",
        "_to_dc",
        "_writer",
        "client",
        "leg",
        "pump",
    )

    def __init__(
        self,
        client: DCClient,
        endpoint: IStreamClientEndpoint,
        init: AcceptedInit,
        *,
        fast: bool,
        from_client: CipherContext,
        to_client: CipherContext | None,
        writer: RecordWriter | None,
        clock: Any,
        splice: bool = False,
    ) -> None:
        self.client = client
        upstream = obfuscated2.generate_init(
            init.tag, init.dc, fast_keys=(init.send_key, init.send_iv) if fast else None
        )
        self._from_client = from_client
        self._to_dc = upstream.encryptor
        self._from_dc = None if fast else upstream.decryptor
        self._to_client = None if fast else to_client
        self._writer = writer
        self._clock = clock
        self._pending = [upstream.wire]
        self._splice = splice
        #: The download direction's splice pump, while it has one.
        self.pump: Pump | None = None
        #: The connection to the DC, once up.
        self.leg: Leg | None = None
        client.transport.pauseProducing()
        self._connecting: Any = connect_protocol(endpoint, Leg(self))
        self._connecting.addErrback(self._failed)

    # -- the client's bytes

    def queue(self, data: bytes) -> None:
        """
        Bytes from the client while the DC is not up yet.
        """
        self.client.bytes_in += len(data)
        self._pending.append(self._to_dc.update(self._from_client.update(data)))

    def relay(self, data: bytes) -> None:
        """
        Bytes from the client, once the DC is up: two AES calls per chunk.
        """
        assert self.leg is not None
        self.client.bytes_in += len(data)
        _twisted.write(self.leg.transport, self._to_dc.update(self._from_client.update(data)))

    def client_lost(self) -> None:
        pump, self.pump = self.pump, None
        if pump is not None:
            pump.stop()
        if self._connecting is not None:
            self._connecting.cancel()
        leg, self.leg = self.leg, None
        if leg is not None and not leg.lost:
            close_peer(leg.transport, self._clock)
        self._pending = []

    # -- LegOwner: the DC's side

    def leg_connected(self, leg: Leg) -> None:
        self._connecting = None
        client = self.client
        if client.closed:
            leg.transport.loseConnection()
            return
        self.leg = leg
        transport = leg.transport
        _twisted.no_delay(transport)
        _twisted.set_read_size(transport)
        _twisted.set_read_size(client.transport)
        transport.write(b"".join(self._pending))
        self._pending = []
        transport.registerProducer(client.transport, True)
        if self._splice and self._from_dc is None and self._writer is None:
            self.pump = start_pump(transport, client.transport, self._delivered, self._unspliced)
        if self.pump is None:
            client.transport.registerProducer(transport, True)
        client.dc_up()

    def _delivered(self, size: int) -> None:
        self.client.bytes_out += size

    def _unspliced(self) -> None:
        self.pump = None
        if self.leg is not None:
            self.client.transport.registerProducer(self.leg.transport, True)

    def leg_data(self, data: bytes) -> None:
        client = self.client
        client.bytes_out += len(data)
        if self._from_dc is not None:
            assert self._to_client is not None
            data = self._to_client.update(self._from_dc.update(data))
        if self._writer is not None:
            data = self._writer.wrap(data, self._clock.seconds())
        _twisted.write(client.transport, data)
        if self.pump is not None:
            # Bytes read before the pump (a SOCKS reply's rest): first in line.
            self.pump.wrote()

    def leg_read_closed(self) -> None:
        pass  # a DC leg is not half-closeable: its end is a loss

    def leg_lost(self, leg: Leg) -> None:
        if leg is not self.leg:
            return
        self.leg = None
        if self.pump is not None:
            self.pump.source_lost()
        if not self.client.closed:
            # The client may still send before its close completes; there
            # is nowhere left to send it.
            self.client.transport.unregisterProducer()
            self.client.dc_lost()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self.client.closed:
            return
        self.client.dc_failed(failure)
