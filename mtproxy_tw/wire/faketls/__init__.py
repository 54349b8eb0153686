"""
Fake-TLS codec for ``ee`` secrets: ClientHello check, ServerHello flight,
record framing.

Everything here is pure: functions take bytes (and the current time where it
matters) and return bytes or small frozen dataclasses. Malformed input raises
:class:`TLSError`. The names below are the package's interface; the modules
are :mod:`.hello`, :mod:`.server`, :mod:`.records`, :mod:`.flight` (the
flight cut for separate segments) and :mod:`.client` (the hello the test
clients send).
"""

from mtproxy_tw.wire.faketls.base import (
    BOOT_TIME_MAX,
    MAX_HELLO_LEN,
    MAX_INCOMING_PAYLOAD,
    MAX_OUTGOING_PAYLOAD,
    MIN_HELLO_LEN,
    MLKEM768_SERVER_SHARE,
    X25519,
    X25519MLKEM768,
    ClientHello,
    HelloMatch,
    HelloRecord,
    NeedMore,
    TLSError,
)
from mtproxy_tw.wire.faketls.client import build_client_hello
from mtproxy_tw.wire.faketls.flight import split_flight
from mtproxy_tw.wire.faketls.hello import (
    choose_cipher_suite,
    parse_client_hello,
    read_client_hello,
    timestamp_ok,
    verify_client_hello,
)
from mtproxy_tw.wire.faketls.records import (
    FULL_RECORD,
    MIN_RECORD,
    RecordWriter,
    TLSRecordReader,
    wrap_records,
)
from mtproxy_tw.wire.faketls.server import (
    build_server_hello,
    check_server_hello,
    fallback_app_data_len,
)

__all__ = [
    "BOOT_TIME_MAX",
    "FULL_RECORD",
    "MAX_HELLO_LEN",
    "MAX_INCOMING_PAYLOAD",
    "MAX_OUTGOING_PAYLOAD",
    "MIN_HELLO_LEN",
    "MIN_RECORD",
    "MLKEM768_SERVER_SHARE",
    "X25519",
    "X25519MLKEM768",
    "ClientHello",
    "HelloMatch",
    "HelloRecord",
    "NeedMore",
    "RecordWriter",
    "TLSError",
    "TLSRecordReader",
    "build_client_hello",
    "build_server_hello",
    "check_server_hello",
    "choose_cipher_suite",
    "fallback_app_data_len",
    "parse_client_hello",
    "read_client_hello",
    "split_flight",
    "timestamp_ok",
    "verify_client_hello",
    "wrap_records",
]
