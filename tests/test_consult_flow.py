"""
The client protocol with a shared state that answers later (workers, a
fleet): nothing is read while it counts, its answers decide, and every
claim is given back however the connection ends.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.config.users import Limits, UserSpec
from mtproxy_tw.proxy.users import Registry
from mtproxy_tw.settings import Settings
from mtproxy_tw.shared.base import Claim
from mtproxy_tw.shared.local import Counters
from mtproxy_tw.testing import FakeDC, RawClient
from mtproxy_tw.testing.memory import MemoryProxy
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import parse_secret
from mtproxy_tw.wire.transports import codec_for_tag

DD = parse_secret("alice=dd" + "a7" * 16, "x")


class SlowState:
    """
    A distributed state whose every answer waits for the test.
    """

    distributed = True

    def __init__(self) -> None:
        self.counters = Counters()
        self.keys: set[bytes] = set()
        self.waiting: list[tuple[str, Deferred[object], object]] = []
        self.released: list[str] = []

    def seen(self, key: bytes) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.waiting.append(("seen", d, key))  # type: ignore[arg-type]
        return d

    def acquire(self, holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
        d: Deferred[str | None] = Deferred()
        self.waiting.append(("acquire", d, (holder, claims)))  # type: ignore[arg-type]
        return d

    def release(self, holder: str) -> None:
        self.released.append(holder)
        self.counters.release(holder)

    def add_usage(self, deltas: Mapping[str, int]) -> Deferred[dict[str, int]]:
        return succeed({})

    def answer_all(self) -> list[str]:
        """
        Answer everything asked so far, as one process would; the kinds asked.
        """
        asked = []
        while self.waiting:
            asked.append(self.answer_next())
        return asked

    def answer_next(self) -> str:
        """
        Answer the oldest question; its kind.
        """
        kind, d, what = self.waiting.pop(0)
        if kind == "seen":
            key = what
            assert isinstance(key, bytes)
            d.callback(key in self.keys)
            self.keys.add(key)
        else:
            holder, claims = what  # type: ignore[misc]
            d.callback(self.counters.acquire(holder, claims))
        return kind


class SlowStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = MemoryProxy(Settings(secrets=(DD,), max_connections=10))
        self.state = SlowState()
        self.proxy.core.shared = self.state
        users = (UserSpec("alice", (DD,), max_connections=2, max_ips=1),)
        self.proxy.core.users = Registry(users, Limits(max_connections_per_ip=5))
        self.dc = FakeDC(self.proxy.reactor)
        self.proxy.serve_dc(2, self.dc)

    def test_claims_then_consults_then_relays(self) -> None:
        client = self.proxy.connect_client(DD, dc=2)
        answer = client.request(b"\x01" + os.urandom(99))
        self.proxy.flush()
        # Counting the connection (its address, the cap): what was read
        # waits, and nothing more is.
        self.assertEqual([kind for kind, _, _ in self.state.waiting], ["acquire"])
        transport = self.proxy.connection_of(client).server_transport
        self.assertFalse(transport.reading)
        # Counted: the init is read at once; not seen before, the user's
        # claims follow.
        self.assertEqual(self.state.answer_all(), ["acquire", "seen", "acquire"])
        self.proxy.flush()
        self.assertTrue(transport.reading)
        self.assertEqual(len(self.successResultOf(answer)), 100)
        counts = self.state.counters.snapshot()
        self.assertEqual(counts["global"], 1)
        self.assertEqual(counts["user:alice"], 1)
        self.assertEqual(counts["ips:alice"], 1)
        client.transport.loseConnection()
        self.proxy.flush()
        self.assertEqual(self.state.counters.snapshot(), {})

    def test_a_read_while_consulting_is_held_and_pauses_the_client(self) -> None:
        client = self.proxy.connect_client(DD, dc=2)
        self.proxy.flush()
        self.assertEqual(self.state.answer_next(), "acquire")  # counted: now asking "seen"
        self.assertEqual([kind for kind, _, _ in self.state.waiting], ["seen"])
        transport = self.proxy.connection_of(client).server_transport
        pauses = transport.read_pauses
        self.assertTrue(transport.reading)  # no read while asking: no pause
        answer = client.request(b"\x01" + os.urandom(99))
        self.proxy.flush()
        self.assertFalse(transport.reading)  # held, and nothing more read
        self.assertEqual(transport.read_pauses, pauses + 1)
        self.assertEqual(self.state.answer_all(), ["seen", "acquire"])
        self.proxy.flush()
        self.assertTrue(transport.reading)
        self.assertEqual(len(self.successResultOf(answer)), 100)

    def test_a_replay_from_another_process_is_refused(self) -> None:
        first = self.proxy.connect_client(DD, dc=2)
        for _ in range(4):
            self.proxy.flush()
            self.state.answer_all()
        self.proxy.flush()
        # The same init again, as another process's client sent it.
        self.state.keys.add(first.init.wire[8:56])
        again = self.proxy.connect_client(DD, dc=2, init=first.init)
        for _ in range(4):
            self.proxy.flush()
            self.state.answer_all()
        self.proxy.flush()
        self.assertTrue(again.lost.called)
        stats = self.proxy.core.stats
        self.assertEqual(stats.rejected["replay"] + stats.fronted["replay"], 1)

    def test_the_user_limit_elsewhere_refuses(self) -> None:
        for other in ("elsewhere", "and-elsewhere"):
            self.state.counters.take(other, [Claim("connections", "user:alice", 2)])
        client = self.proxy.connect_client(DD, dc=2)
        for _ in range(4):
            self.proxy.flush()
            self.state.answer_all()
        self.proxy.flush()
        self.assertTrue(client.lost.called)
        self.assertEqual(self.proxy.core.stats.limited["connections"], 1)
        # Nothing of it stays counted.
        self.assertEqual(self.state.counters.snapshot(), {"user:alice": 2})

    def test_gone_while_counted_gives_everything_back(self) -> None:
        client = self.proxy.connect_client(DD, dc=2)
        self.proxy.flush()
        self.proxy.connection_of(client).client_transport.abortConnection()
        self.proxy.flush()
        # The answer comes after the connection is gone: given back at once.
        self.state.answer_all()
        self.proxy.flush()
        self.assertEqual(self.state.counters.snapshot(), {})

    def test_no_answer_ends_at_the_handshake_timeout(self) -> None:
        client = self.proxy.connect_client(DD, dc=2)
        self.proxy.flush()
        self.proxy.advance(self.proxy.core.settings.handshake_timeout + 1)
        self.assertTrue(client.lost.called)
        self.assertEqual(self.proxy.core.stats.rejected["handshake-timeout"], 1)
        self.assertEqual(self.proxy.core.clients, set())


class AnyTimingTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(
        cuts=st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=6),
        answers=st.lists(st.integers(min_value=0, max_value=2), min_size=6, max_size=6),
    )
    def test_any_cuts_and_answer_times(self, cuts: list[int], answers: list[int]) -> None:
        """
        However the init and a packet are cut, and whenever the shared state
        answers, the packet is relayed; and while the proxy holds bytes for
        an answer, it reads nothing more.
        """
        proxy = MemoryProxy(Settings(secrets=(DD,), max_connections=10))
        state = SlowState()
        proxy.core.shared = state
        proxy.serve_dc(2, FakeDC(proxy.reactor))
        streams = generate_init(TAG_PADDED, 2, DD.key)
        packet = codec_for_tag(TAG_PADDED).encode(b"\x01" + bytes(99))  # padded: 0-3 bytes more
        wire = streams.wire + streams.encryptor.update(packet)
        client = RawClient()
        connection = proxy.accept(client)
        server, transport = connection.server, connection.server_transport
        pieces, at = [], 0
        for cut in cuts:
            pieces.append(wire[at : at + cut])
            at += cut
        pieces.append(wire[at:])
        for piece, answered in zip(pieces, answers + [2] * len(pieces), strict=False):
            if piece:
                client.write(piece)
            proxy.flush()
            for _ in range(answered):
                if state.waiting:
                    state.answer_next()
            handshake = server.handshake
            holding = bool(server._waiting) or (handshake is not None and handshake.holding)
            if holding:
                self.assertFalse(transport.reading)
        for _ in range(10):
            state.answer_all()
            proxy.flush()
        self.assertEqual(proxy.core.stats.accepted.get("alice"), 1)
        echoed = codec_for_tag(TAG_PADDED).feed(streams.decryptor.update(bytes(client.received)))
        self.assertEqual([p.payload for p in echoed], [b"\x01" + bytes(99)])
