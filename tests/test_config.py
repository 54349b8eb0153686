"""
The configuration model: one table of options behind the command line, the
TOML file and the docs.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw import tap
from mtproxy_tw.config import reference, tomlfile
from mtproxy_tw.config.schema import OPTIONS, Kind
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.secrets import Mode

ROOT = Path(__file__).parent.parent
DD = "dd" + "a7" * 16
EE = "ee" + "e5" * 16 + b"example.com".hex()
AD_TAG = "ab" * 16

EVERY_TYPE = f"""
# strings, whole numbers, numbers, booleans, arrays and sizes
public_host = "proxy.example.org"
max_connections = 200
handshake_timeout = 2.5
idle_timeout = 30
prefer_ipv6 = true
no_fast_mode = false
mask = true
secret = ["alice={DD}", "bob={EE}"]
listen = ["tcp:0:interface=127.0.0.1"]
dc = ["2=127.0.0.1:4430", "-2=[::1]:443"]
tls_domain = ["Other.Example"]
modes = ["secure", "tls"]
mask_host = "127.0.0.1:8443"
ad_tag = "{AD_TAG}"
nat_ip = ["203.0.113.9"]
client_buffer_cap = "512K"
middle_pool_max = 4
"""


class FileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def refused(self, text: str, *argv: str) -> str:
        path = self.write(text)
        with self.assertRaises(UsageError) as raised:
            self.parse("--config", path, *argv)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(f"--config: {path}: "), message)
        return message

    def test_every_kind_of_key(self) -> None:
        options = self.parse("--config", self.write(EVERY_TYPE))
        self.assertEqual(options["public-host"], "proxy.example.org")
        self.assertEqual(options["max-connections"], 200)
        self.assertEqual(options["handshake-timeout"], 2.5)
        self.assertEqual(options["idle-timeout"], 30.0)
        self.assertTrue(options["prefer-ipv6"])
        self.assertFalse(options["no-fast-mode"])
        self.assertTrue(options["mask"])
        self.assertEqual([s.name for s in options["secrets"]], ["alice", "bob"])
        self.assertEqual(options["listen"], ["tcp:0:interface=127.0.0.1"])
        self.assertEqual(options["dc"], {2: Address("127.0.0.1", 4430), -2: Address("::1", 443)})
        self.assertEqual(options["tls-domains"], ["other.example"])
        self.assertEqual(options["modes"], {Mode.SECURE, Mode.TLS})
        self.assertEqual(options["mask-host"], Address("127.0.0.1", 8443))
        middle = options["middle"]
        self.assertEqual(middle.ad_tag, bytes.fromhex(AD_TAG))
        self.assertEqual(middle.nat_ips, (ipaddress.ip_address("203.0.113.9"),))
        self.assertEqual(middle.client_buffer_cap, 512 << 10)
        self.assertEqual(middle.pool_max, 4)
        settings = tap.settings_from_options(options, tuple(options["secrets"]))
        self.assertEqual(settings.handshake_timeout, 2.5)
        self.assertTrue(settings.dcs.prefer_ipv6)
        self.assertEqual(settings.extra_tls_domains, {"other.example"})

    def test_a_string_is_a_one_item_array(self) -> None:
        options = self.parse("--config", self.write(f'secret = "alice={DD}"'))
        self.assertEqual([s.name for s in options["secrets"]], ["alice"])

    def test_command_line_wins(self) -> None:
        path = self.write(EVERY_TYPE)
        options = self.parse("--config", path, "--max-connections", "7", "--secret", "carol=" + DD)
        self.assertEqual(options["max-connections"], 7)
        self.assertEqual([s.name for s in options["secrets"]], ["carol"])
        self.assertEqual(options["handshake-timeout"], 2.5)

    def test_defaults_without_a_file(self) -> None:
        options = self.parse("--secret", DD)
        for spec in OPTIONS:
            if spec.kind is Kind.PARAM and spec.default is not None:
                self.assertEqual(options[spec.name], spec.default, spec.name)

    def test_unknown_key(self) -> None:
        message = self.refused("max_conections = 5\n")
        self.assertIn("max_conections: not an option", message)
        message = self.refused("max-connections = 5\n")
        self.assertIn("did you mean max_connections?", message)

    def test_wrong_types(self) -> None:
        for text, key, why in [
            ('replay_capacity = "many"', "replay_capacity", "must be a whole number"),
            ("max_connections = 2.5", "max_connections", "must be a whole number"),
            ("handshake_timeout = true", "handshake_timeout", "must be a whole number or"),
            ('prefer_ipv6 = "yes"', "prefer_ipv6", "must be true or false"),
            ("secret = [1, 2]", "secret", "must be an array of strings"),
            ("listen = 443", "listen", "must be an array of strings"),
            ("public_host = 5", "public_host", "must be a string"),
        ]:
            message = self.refused(text + "\n")
            self.assertIn(f"{key}: {why}", message)

    def test_max_connections_auto(self) -> None:
        path = self.write('max_connections = "auto"\n')
        self.assertIsNone(self.parse("--config", path, "--secret", DD)["max-connections"])
        message = self.refused('max_connections = "many"\n')
        self.assertIn("max_connections: 'many' is not a whole number (or auto)", message)

    def test_bad_values(self) -> None:
        for text, key in [
            ("handshake_timeout = 0", "handshake_timeout"),
            ("max_connections = 0", "max_connections"),
            ('secret = ["xyz"]', "secret"),
            ('dc = ["2=nowhere"]', "dc"),
            ('modes = "fast"', "modes"),
            ('ad_tag = "xyz"', "ad_tag"),
            ('proxy_config_url = "ftp://x/y"', "proxy_config_url"),
            ('client_buffer_cap = "1K"', "client_buffer_cap"),
            ('tls_domain = ["bad..name"]', "tls_domain"),
            ("port = 70000", "port"),
        ]:
            message = self.refused(text + "\n")
            self.assertIn(f": {key}: ", message)

    def test_secrets_never_in_errors(self) -> None:
        message = self.refused(f'ad_tag = "{AD_TAG}"\nmiddle_pool_min = 0\n')
        self.assertNotIn(AD_TAG, message)

    def test_not_toml(self) -> None:
        self.assertIn("not valid TOML", self.refused("port = = 1\n"))

    def test_missing_file(self) -> None:
        with self.assertRaises(UsageError) as raised:
            self.parse("--config", "/nonexistent/mtproxy.toml")
        self.assertIn("cannot be read", str(raised.exception))

    def test_every_option_has_a_key(self) -> None:
        for spec in OPTIONS:
            if spec.name != "config":
                self.assertIn(spec.key, tomlfile._KEYS)


class ReferenceTests(SynchronousTestCase):
    """
    The docs' option reference is the table's own.
    """

    def test_docs_are_current(self) -> None:
        for name in ("README.md", "docs/usage.rst"):
            path = ROOT / name
            self.assertEqual(
                path.read_text(),
                reference.render(path),
                f"{name} is out of date: python -m mtproxy_tw.config.reference {name}",
            )

    def test_help_lists_every_option(self) -> None:
        text = tap.Options().getUsage()
        for spec in OPTIONS:
            self.assertIn(f"--{spec.name}", text)


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def service(self, text: str, *argv: str) -> tuple[Path, Any]:
        path = Path(self.mktemp())
        path.write_text(text)
        options = tap.Options()
        options.parseOptions(
            ["--config", str(path), "--state-dir", self.mktemp(), "--port", "0", *argv]
        )
        top = tap.makeService(options, MemoryReactorClock())
        reloader = next(s for s in top if isinstance(s, tap.SecretsReloader))
        return path, reloader

    def warnings(self) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_level", LogLevel.info) >= LogLevel.warn
        ]

    def test_sighup_applies_secrets_and_names_the_rest(self) -> None:
        path, reloader = self.service(f'secret = ["alice={DD}"]\nidle_timeout = 30\n')
        proxy = reloader.proxy
        self.assertEqual([s.name for s in proxy.settings.secrets], ["alice"])
        path.write_text(f'secret = ["alice={DD}", "bob={EE}"]\nidle_timeout = 60\n')
        self.assertTrue(reloader.reload())
        self.assertEqual([s.name for s in proxy.settings.secrets], ["alice", "bob"])
        self.assertEqual(proxy.settings.idle_timeout, 30)
        (warning,) = self.warnings()
        self.assertIn("idle_timeout changed", warning)
        self.assertIn("restart", warning)

    def test_a_broken_file_changes_nothing(self) -> None:
        path, reloader = self.service(f'secret = ["alice={DD}"]\n')
        path.write_text("secret = [1]\n")
        self.assertFalse(reloader.reload())
        self.assertEqual([s.name for s in reloader.proxy.settings.secrets], ["alice"])

    def test_command_line_secrets_stay(self) -> None:
        path, reloader = self.service(f'secret = ["alice={DD}"]\n', "--secret", "carol=" + EE)
        path.write_text(f'secret = ["bob={DD}"]\n')
        self.assertTrue(reloader.reload())
        self.assertEqual([s.name for s in reloader.proxy.settings.secrets], ["carol"])
        self.assertEqual(self.warnings(), [])


class UsersInTheFileTests(SynchronousTestCase):
    def test_users_and_limits_from_the_file_and_on_sighup(self) -> None:
        path = Path(self.mktemp())
        path.write_text(
            f'[users.alice]\nsecret = "{DD}"\nmax_connections = 2\n'
            f'[users.bob]\nsecrets = ["{EE}"]\nquota = "1G"\n'
            "[limits]\nmax_connections_per_ip = 8\n"
        )
        options = tap.Options()
        options.parseOptions(["--config", str(path), "--state-dir", self.mktemp(), "--port", "0"])
        top = tap.makeService(options, MemoryReactorClock())
        reloader = next(s for s in top if isinstance(s, tap.SecretsReloader))
        proxy = reloader.proxy
        registry = proxy.core.users
        assert registry is not None
        self.assertEqual(sorted(s.name for s in proxy.settings.secrets), ["alice", "bob"])
        self.assertEqual(registry.user_of("bob"), "bob")
        self.assertEqual(registry.spec("alice").max_connections, 2)
        path.write_text(f'[users.alice]\nsecret = "{DD}"\nmax_connections = 1\n')
        self.assertTrue(reloader.reload())
        self.assertEqual([s.name for s in proxy.settings.secrets], ["alice"])
        self.assertIsNone(registry.user_of("bob"))
        self.assertEqual(registry.spec("alice").max_connections, 1)

    def test_a_bad_user_table_is_one_line(self) -> None:
        path = Path(self.mktemp())
        path.write_text(f'[users.alice]\nsecret = "{DD}"\nquota = "lots"\n')
        options = tap.Options()
        with self.assertRaises(UsageError) as raised:
            options.parseOptions(["--config", str(path)])
        message = str(raised.exception)
        self.assertIn("users.alice.quota", message)
        self.assertNotIn("\n", message)
