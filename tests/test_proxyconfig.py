"""
Tests for mtproxy_tw.wire.proxyconfig: getProxyConfig parsing, lookup, fallbacks, secrets.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire.proxyconfig import (
    FALLBACK_CONFIG_V4,
    FALLBACK_CONFIG_V6,
    PROXY_SECRET_SIZE,
    ConfigError,
    Endpoint,
    ProxyConfig,
    format_proxy_config,
    parse_proxy_config,
    validate_proxy_config,
    validate_proxy_secret,
)

SAMPLE = """\
# force_probability 1 10
default 2;
proxy_for 1 149.154.175.50:8888;
proxy_for -1 149.154.175.50:8888;
proxy_for 2 149.154.162.39:80;
proxy_for 2 149.154.162.33:80;
"""

SAMPLE_V6 = """\
default 2;
proxy_for 2 [2001:67c:4e8:f002::d]:80;
proxy_for 4 2001:67c:4e8:f004::d:8888;
proxy_for -4 [2001:67C:4E8:F004:0:0:0:D]:8888;
"""


class ParseTests(SynchronousTestCase):
    def test_sample(self) -> None:
        config = parse_proxy_config(SAMPLE)
        self.assertEqual(
            dict(config.clusters),
            {
                1: (("149.154.175.50", 8888),),
                -1: (("149.154.175.50", 8888),),
                2: (("149.154.162.39", 80), ("149.154.162.33", 80)),
            },
        )
        self.assertEqual(config.default_dc, 2)
        self.assertIsNone(config.min_connections)
        self.assertIsNone(config.max_connections)
        self.assertIsNone(config.timeout_ms)

    def test_ipv6(self) -> None:
        config = parse_proxy_config(SAMPLE_V6)
        self.assertEqual(config.lookup(2), (("2001:67c:4e8:f002::d", 80),))
        self.assertEqual(config.lookup(4), (("2001:67c:4e8:f004::d", 8888),))
        self.assertEqual(config.lookup(-4), (("2001:67c:4e8:f004::d", 8888),))

    def test_lookup_default_rule(self) -> None:
        config = parse_proxy_config(SAMPLE)
        twos = (("149.154.162.39", 80), ("149.154.162.33", 80))
        self.assertEqual(config.lookup(1), (("149.154.175.50", 8888),))
        self.assertEqual(config.lookup(-1), (("149.154.175.50", 8888),))
        for dc in (0, 3, -3, 203, 10002, -32768):
            self.assertEqual(config.lookup(dc), twos)

    def test_lookup_explicit_default(self) -> None:
        config = parse_proxy_config("default -1; proxy_for -1 1.2.3.4:5; proxy_for 0 5.6.7.8:9;")
        self.assertEqual(config.default_dc, -1)
        self.assertEqual(config.lookup(7), (("1.2.3.4", 5),))
        self.assertEqual(config.lookup(0), (("1.2.3.4", 5),))

    def test_missing_default_cluster(self) -> None:
        config = parse_proxy_config("proxy_for 1 1.2.3.4:5;")
        self.assertEqual(config.default_dc, 2)
        self.assertEqual(config.lookup(9), ())

    def test_free_form(self) -> None:
        text = (
            "  # header\r\n\tdefault\n2 ;proxy_for 1 1.2.3.4:5;proxy_for 2\n\n"
            "host-a.example.org:443 # trailing comment\n;\n;;# end"
        )
        config = parse_proxy_config(text)
        self.assertEqual(
            dict(config.clusters), {1: (("1.2.3.4", 5),), 2: (("host-a.example.org", 443),)}
        )

    def test_options(self) -> None:
        config = parse_proxy_config(
            SAMPLE + "min_connections 4; max_connections 8;\ntimeout 10000;"
        )
        self.assertEqual(
            (config.min_connections, config.max_connections, config.timeout_ms), (4, 8, 10000)
        )

    def test_bytes(self) -> None:
        self.assertEqual(parse_proxy_config(SAMPLE.encode()), parse_proxy_config(SAMPLE))
        self.assertRaises(ConfigError, parse_proxy_config, b"\xff" + SAMPLE.encode())

    def test_clusters_read_only(self) -> None:
        config = parse_proxy_config(SAMPLE)

        def mutate() -> None:
            config.clusters[3] = ()  # type: ignore[index]

        self.assertRaises(TypeError, mutate)


class ErrorTests(SynchronousTestCase):
    def assertConfigError(self, text: str, message: str) -> None:
        error = self.assertRaises(ConfigError, parse_proxy_config, text)
        self.assertIn(message, str(error))

    def test_empty(self) -> None:
        for text in ("", "  \n", "# only a comment\n", "default 2;", ";;"):
            self.assertConfigError(text, "no proxy_for")

    def test_line_numbers(self) -> None:
        self.assertConfigError(SAMPLE + "proxy_for 3 1.2.3.4;\n", "line 7: ")
        self.assertConfigError("proxy_for 1 1.2.3.4:5;\n\n  bogus 1;", "line 3: unknown directive")
        self.assertConfigError("proxy_for 1\n\n1.2.3.4:5", "line 1: missing ';'")

    def test_bad_statements(self) -> None:
        cases = {
            "proxy_for 1 1.2.3.4:0;": "bad port",
            "proxy_for 1 1.2.3.4:65536;": "bad port",
            "proxy_for 1 1.2.3.4:x;": "bad port",
            "proxy_for 1 1.2.3.4;": "expected host:port",
            "proxy_for 1 :80;": "expected host:port",
            "proxy_for 1 1.2.3.256:80;": "bad IPv4",
            "proxy_for 1 1.2.3:80;": "bad IPv4",
            "proxy_for 1 [1.2.3.4]:80;": "bad IPv6",
            "proxy_for 1 [fe80::1%eth0]:80;": "bad IPv6",
            "proxy_for 1 2001:db8::g:80;": "bad IPv6",
            "proxy_for 1 bad_host:80;": "bad host",
            "proxy_for 32768 1.2.3.4:80;": "bad dc id",
            "proxy_for 1.5 1.2.3.4:80;": "bad dc id",
            "proxy_for 1;": "wrong number of arguments",
            "proxy_for 1 1.2.3.4:80 5;": "wrong number of arguments",
            "default;": "wrong number of arguments",
            "default x;": "bad default",
            "min_connections 0;": "bad min_connections",
            "max_connections 1001;": "bad max_connections",
            "timeout 9;": "bad timeout",
            "timeout 30001;": "bad timeout",
            "default 2; default 2;": "duplicate default",
            "proxy 1.2.3.4:80;": "unknown directive",
        }
        for text, message in cases.items():
            self.assertConfigError("proxy_for 2 1.2.3.4:80;\n" + text, f"line 2: {message}")

    def test_inconsistent(self) -> None:
        self.assertConfigError("default 3; proxy_for 2 1.2.3.4:80;", "default cluster 3")
        self.assertConfigError(
            "proxy_for 2 1.2.3.4:80; min_connections 9; max_connections 8;", "min_connections"
        )


class FallbackTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        expected = {
            1: "149.154.175.50",
            -1: "149.154.175.50",
            2: "149.154.161.144",
            -2: "149.154.161.144",
            3: "149.154.175.100",
            -3: "149.154.175.100",
            4: "91.108.4.136",
            -4: "149.154.165.109",
            5: "91.108.56.183",
            -5: "91.108.56.183",
        }
        self.assertEqual(
            dict(FALLBACK_CONFIG_V4.clusters), {dc: ((ip, 8888),) for dc, ip in expected.items()}
        )
        self.assertEqual(FALLBACK_CONFIG_V4.lookup(0), (("149.154.161.144", 8888),))

    def test_ipv6(self) -> None:
        expected = {
            1: ("2001:b28:f23d:f001::d", 8888),
            2: ("2001:67c:4e8:f002::d", 80),
            3: ("2001:b28:f23d:f003::d", 8888),
            4: ("2001:67c:4e8:f004::d", 8888),
            5: ("2001:b28:f23f:f005::d", 8888),
        }
        clusters = {dc: (ep,) for dc, ep in expected.items()}
        clusters.update({-dc: (ep,) for dc, ep in expected.items()})
        self.assertEqual(dict(FALLBACK_CONFIG_V6.clusters), clusters)
        self.assertEqual(FALLBACK_CONFIG_V6.default_dc, 2)

    def test_fallbacks_round_trip(self) -> None:
        for config in (FALLBACK_CONFIG_V4, FALLBACK_CONFIG_V6):
            self.assertEqual(parse_proxy_config(format_proxy_config(config)), config)


class SecretTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        self.assertEqual(PROXY_SECRET_SIZE, 128)
        for data in (bytes(range(128)), bytes(range(128, 256)), os.urandom(128)):
            self.assertEqual(validate_proxy_secret(data), data)
        # Telegram's secret is 128 bytes; other proxies accept 32..256, we do not.
        for size in (0, 16, 31, 32, 127, 129, 256, 257):
            error = self.assertRaises(ConfigError, validate_proxy_secret, os.urandom(size))
            self.assertIn(str(size), str(error))

    def test_text_is_refused(self) -> None:
        pages = [
            b"<html><body>Service unavailable</body></html>" * 3,
            # "Access denied" in Russian, UTF-8.
            (
                "<html><body>\u0414\u043e\u0441\u0442\u0443\u043f "
                "\u0437\u0430\u043f\u0440\u0435\u0449\u0451\u043d</body></html>"
            ).encode(),
            ("<p>Zugriff verweigert, \xfcberpr\xfcfen</p>" * 4).encode("latin-1"),
            b"a" * 128,
        ]
        for page in pages:
            page = (page * 4)[:128]
            error = self.assertRaises(ConfigError, validate_proxy_secret, page)
            self.assertIn("text", str(error))
            self.assertNotIn(page[:20].decode("latin-1"), str(error))


class UsableConfigTests(SynchronousTestCase):
    def test_default_dc_must_be_listed(self) -> None:
        self.assertEqual(validate_proxy_config(SAMPLE), parse_proxy_config(SAMPLE))
        self.assertEqual(validate_proxy_config("proxy_for 2 1.2.3.4:5;").default_dc, 2)
        error = self.assertRaises(ConfigError, validate_proxy_config, "proxy_for 4 1.2.3.4:5;")
        self.assertIn("default DC 2", str(error))
        config = validate_proxy_config("default 4; proxy_for 4 1.2.3.4:5;")
        self.assertEqual(config.default_dc, 4)
        self.assertRaises(ConfigError, validate_proxy_config, "<html><body>502</body></html>")


hosts = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i))),
    st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i))),
    st.sampled_from(["localhost", "me-1.example.org", "a", "x9.y-8.z"]),
)
endpoints: st.SearchStrategy[Endpoint] = st.tuples(hosts, st.integers(1, 65535))
dcs = st.integers(-32768, 32767)


@st.composite
def configs(draw: st.DrawFn) -> ProxyConfig:
    clusters = draw(
        st.dictionaries(
            dcs, st.lists(endpoints, min_size=1, max_size=2).map(tuple), min_size=1, max_size=4
        )
    )
    low = draw(st.none() | st.integers(1, 1000))
    high = draw(st.none() | st.integers(low or 1, 1000))
    return ProxyConfig(
        clusters,
        draw(st.sampled_from(sorted(clusters))),
        low,
        high,
        draw(st.none() | st.integers(10, 30000)),
    )


config_words = st.sampled_from(
    ["proxy_for", "default", "timeout", "min_connections", "-1", "2", "1.2.3.4:80", "[::1]:5"]
)
config_text = st.lists(
    st.one_of(config_words, st.sampled_from([";", " ", "\n", "#", ":", "[", "]"]), st.text()),
    max_size=30,
).map("".join)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(configs())
    def test_round_trip(self, config: ProxyConfig) -> None:
        parsed = parse_proxy_config(format_proxy_config(config))
        self.assertEqual(parsed, config)
        for dc in (0, *config.clusters):
            self.assertEqual(parsed.lookup(dc), config.lookup(dc))

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.text(), config_text))
    def test_random_text(self, text: str) -> None:
        with contextlib.suppress(ConfigError):
            parse_proxy_config(text)

    @settings(max_examples=100, deadline=None)
    @given(st.binary())
    def test_random_bytes(self, data: bytes) -> None:
        with contextlib.suppress(ConfigError):
            parse_proxy_config(data)
