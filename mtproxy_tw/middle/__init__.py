"""
Middle-proxy mode: clients multiplexed over RPC connections to Telegram's
middle proxies (PROTOCOL.md section 8).

- :class:`~mtproxy_tw.middle.upstream.MiddleProxy` is the upstream the relay
  talks to (``core.middle``): its ``attach`` gives every client a
  :class:`~mtproxy_tw.middle.session.ClientSession` on the pool of its DC.
- :class:`~mtproxy_tw.middle.pool.DCPool` keeps ``pool_min`` ..
  ``pool_max`` RPC connections per DC, binds each client to the least
  loaded one, grows with load, skips unreachable middle proxies with
  backoff and re-establishes lost connections.
- :class:`~mtproxy_tw.middle.connection.MEConnection` is one RPC channel:
  nonce exchange, key derivation with the external address, RPC_HANDSHAKE
  with real process ids, then RPC_PROXY_REQ out and RPC_PROXY_ANS /
  SIMPLE_ACK / CLOSE_EXT / PING in; its states are in
  :mod:`mtproxy_tw.middle.states`.
- :class:`~mtproxy_tw.middle.address.ExternalAddress` decides which address
  enters the key derivation: ``--nat-ip``, a public local address, else an
  HTTP look-up.
- :class:`~mtproxy_tw.middle.direct.DirectLeg` carries a client straight to
  its DC when every middle proxy of it is unreachable (``direct_fallback``).
- :mod:`mtproxy_tw.middle.settings` holds
  :class:`~mtproxy_tw.middle.settings.MiddleSettings` and the config sources.
- :class:`~mtproxy_tw.middle.telegramconfig.TelegramConfig` keeps the
  middle-proxy lists and the proxy secret fresh, with
  :mod:`~mtproxy_tw.middle.fetch` (downloads),
  :mod:`~mtproxy_tw.middle.cache` (copies in the state directory) and
  :mod:`~mtproxy_tw.middle.clock` (the clock check).

The package's ``__init__`` imports nothing: import each name from its module.
"""
