"""
Named users and limits: the config tables, and the registry that decides
and counts (every limit, and exact counts under any order of calls).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.config import tomlfile
from mtproxy_tw.config.tomlfile import ConfigError
from mtproxy_tw.config.users import (
    Limits,
    UserSpec,
    format_size,
    parse_limits,
    parse_quota,
    parse_users,
    user_secrets,
)
from mtproxy_tw.proxy.users import Registry, _Networks
from mtproxy_tw.wire.secrets import Mode, Secret

KEY_A = "0123456789abcdef0123456789abcdef"
KEY_B = "00112233445566778899aabbccddeeff"
KEY_C = "ffeeddccbbaa99887766554433221100"
EE_B = "ee" + KEY_B + b"example.com".hex()
TAG = "0123456789abcdef0123456789abcdef"

EXAMPLE = f"""
port = 443

[users.alice]
secret = "dd{KEY_A}"
max_connections = 16
max_ips = 3
expires = 2027-03-01T00:00:00Z
quota = "20GB"
enabled = true
ad_tag = "{TAG}"

[users.bob]
secrets = ["{KEY_B}", "{EE_B}"]

[limits]
max_connections_per_ip = 64
allow = ["0.0.0.0/0", "::/0"]
deny = ["203.0.113.0/24"]
"""

MARCH_2027 = datetime.datetime(2027, 3, 1, tzinfo=datetime.timezone.utc).timestamp()


def users(text: str) -> tuple[UserSpec, ...]:
    found = tomlfile.parse_text(text)
    result: tuple[UserSpec, ...] = found["users"]
    return result


def secret(name: str, key: str = KEY_A) -> Secret:
    return Secret(name, bytes.fromhex(key), Mode.CLASSIC)


def user(name: str, key: str = KEY_A, **limits: Any) -> UserSpec:
    return UserSpec(name, (secret(name, key),), **limits)


class ConfigTests(SynchronousTestCase):
    def test_example(self) -> None:
        found = tomlfile.parse_text(EXAMPLE)
        self.assertEqual(found["port"], 443)
        alice, bob = found["users"]
        self.assertEqual(alice.name, "alice")
        self.assertEqual([(s.name, s.kind) for s in alice.secrets], [("alice", Mode.SECURE)])
        self.assertEqual(alice.secrets[0].key, bytes.fromhex(KEY_A))
        self.assertEqual(alice.max_connections, 16)
        self.assertEqual(alice.max_ips, 3)
        self.assertEqual(alice.expires, MARCH_2027)
        self.assertEqual(alice.quota, 20 << 30)
        self.assertTrue(alice.enabled)
        self.assertEqual(alice.ad_tag, bytes.fromhex(TAG))
        self.assertEqual(
            [(s.name, s.kind, s.domain) for s in bob.secrets],
            [("bob", Mode.CLASSIC, None), ("bob.2", Mode.TLS, "example.com")],
        )
        self.assertEqual(
            (bob.max_connections, bob.max_ips, bob.expires, bob.quota, bob.ad_tag),
            (None, None, None, None, None),
        )
        self.assertEqual([s.name for s in user_secrets(found["users"])], ["alice", "bob", "bob.2"])
        limits = found["limits"]
        self.assertEqual(limits.max_connections_per_ip, 64)
        self.assertEqual(
            limits.allow, (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
        )
        self.assertEqual(limits.deny, (ipaddress.ip_network("203.0.113.0/24"),))

    def test_documented_example(self) -> None:
        readme = (Path(__file__).parent.parent / "README.md").read_text()
        section = readme.split("### Users and limits", 1)[1]
        example = section.split("```toml\n", 1)[1].split("```", 1)[0]
        found = tomlfile.parse_text(example)
        self.assertEqual([u.name for u in found["users"]], ["alice", "bob"])
        self.assertEqual(found["users"][0].quota, 20 << 30)
        self.assertEqual(found["limits"].allow_file, Path("/etc/mtproxy-tw/allow.txt"))

    def test_load_from_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text(EXAMPLE)
        found = tomlfile.load(path)
        self.assertEqual([u.name for u in found["users"]], ["alice", "bob"])
        self.assertIsInstance(found["limits"], Limits)

    def test_tables_absent(self) -> None:
        self.assertEqual(tomlfile.parse_text("port = 443"), {"port": 443})

    def test_nothing_secret_in_repr(self) -> None:
        (alice, _bob) = users(EXAMPLE)
        text = repr(alice) + alice.describe()
        self.assertNotIn(TAG, text)
        self.assertNotIn(KEY_A, text)
        self.assertIn("alice", text)

    def test_describe(self) -> None:
        (alice, bob) = users(EXAMPLE)
        self.assertEqual(
            alice.describe(),
            "1 secret, at most 16 connections, at most 3 addresses, quota 20 GiB, "
            "expires 2027-03-01 00:00:00Z, own ad tag",
        )
        self.assertEqual(bob.describe(), "2 secrets")
        self.assertEqual(
            UserSpec("c", (secret("c"),), enabled=False).describe(), "1 secret, disabled"
        )

    def test_quota_sizes(self) -> None:
        cases = {
            "20GB": 20 << 30,
            "20G": 20 << 30,
            "20GiB": 20 << 30,
            "20 gb": 20 << 30,
            "1.5TiB": 3 << 39,
            "512MiB": 512 << 20,
            "10K": 10 << 10,
            "100B": 100,
            "100": 100,
            1000: 1000,
        }
        for value, expected in cases.items():
            self.assertEqual(parse_quota(value), expected, value)
        for bad in ("20XB", "-1", "", "GB", "1.5.2G", "20iB", 0, -5, True, 1.5, [1]):
            self.assertRaises(ValueError, parse_quota, bad)

    def test_format_size(self) -> None:
        self.assertEqual(format_size(20 << 30), "20 GiB")
        self.assertEqual(format_size(1536), "1.5 KiB")
        self.assertEqual(format_size(10), "10 B")

    def test_expires_forms(self) -> None:
        cases = {
            "2027-03-01T00:00:00Z": MARCH_2027,
            "2027-03-01T02:00:00+02:00": MARCH_2027,
            "2027-03-01T00:00:00": MARCH_2027,  # naive is UTC
            "2027-03-01": MARCH_2027,  # a date is its midnight UTC
            '"2027-03-01T00:00:00Z"': MARCH_2027,  # quoted, as people do
            '"2027-03-01"': MARCH_2027,
            "2027-03-01T00:00:30.5Z": MARCH_2027 + 30.5,
        }
        for value, expected in cases.items():
            (found,) = users(f'[users.a]\nsecret = "{KEY_A}"\nexpires = {value}\n')
            self.assertEqual(found.expires, expected, value)

    def refused(self, text: str) -> str:
        e = self.assertRaises(ConfigError, tomlfile.parse_text, text, "f.toml")
        message = str(e)
        self.assertNotIn("\n", message)
        for key in (KEY_A, KEY_B, TAG):
            self.assertNotIn(key, message)
        return message

    def test_user_errors(self) -> None:
        base = f'[users.alice]\nsecret = "{KEY_A}"\n'
        cases = {
            base + "qouta = 5": "f.toml: users.alice.qouta: not a key of a user (secret, ",
            base + 'max_connections = "16"': "f.toml: users.alice.max_connections: must be a",
            base + "max_connections = 0": "f.toml: users.alice.max_connections: must be at",
            base + "max_ips = true": "f.toml: users.alice.max_ips: must be a whole number",
            base + "max_ips = 1.5": "f.toml: users.alice.max_ips: must be a whole number",
            base + 'enabled = "yes"': "f.toml: users.alice.enabled: must be true or false",
            base + 'quota = "lots"': "f.toml: users.alice.quota: 'lots' is not a size",
            base + "quota = 0": "f.toml: users.alice.quota: must be at least 1 byte",
            base + "expires = 12:00:00": "f.toml: users.alice.expires: must be a TOML date",
            base + 'expires = "soon"': "f.toml: users.alice.expires: must be a TOML date",
            base + "expires = 5": "f.toml: users.alice.expires: must be a TOML date",
            base + 'ad_tag = "abc"': "f.toml: users.alice.ad_tag: must be 32 hex digits",
            base + "ad_tag = 5": "f.toml: users.alice.ad_tag: must be a string",
            "[users.alice]\nmax_ips = 2": "f.toml: users.alice: a user needs a secret",
            base + f'secrets = ["{KEY_B}"]': "f.toml: users.alice: give secret or secrets",
            '[users.alice]\nsecret = "!!"': "f.toml: users.alice.secret: not hex",
            f'[users.alice]\nsecrets = ["{KEY_A}", "{KEY_B[:-2]}"]': (
                "f.toml: users.alice.secrets[1]: expected 32 hex digits"
            ),
            "[users.alice]\nsecrets = []": "f.toml: users.alice.secrets: must be a string or",
            "[users.alice]\nsecret = 5": "f.toml: users.alice.secret: must be a string or",
            f'[users."al.ice"]\nsecret = "{KEY_A}"': (
                "f.toml: users.al.ice: a user's name may hold letters, digits, _ and - only"
            ),
            f'[users."al ice"]\nsecret = "{KEY_A}"': "f.toml: users.al ice: a user's name",
            "users = 5": "f.toml: users: must be a table of [users.NAME] tables",
            "[users]\nalice = 5": "f.toml: users.alice: must be a table",
            base + f'[users.bob]\nsecret = "dd{KEY_A}"': (
                "f.toml: users.bob: a secret has the same key as one of users.alice"
            ),
        }
        for text, expected in cases.items():
            self.assertTrue(self.refused(text).startswith(expected), (text, self.refused(text)))

    def test_secret_with_name_prefix(self) -> None:
        # secret = "bob=..." inside [users.alice] is not a way to rename it.
        message = self.refused(f'[users.alice]\nsecret = "bob={KEY_A}"')
        self.assertTrue(message.startswith("f.toml: users.alice.secret: "), message)

    def test_one_user_may_repeat_a_key(self) -> None:
        # dd and ee forms of one key: the same user, no ambiguity.
        (found,) = users(f'[users.a]\nsecrets = ["dd{KEY_B}", "{EE_B}"]')
        self.assertEqual([s.name for s in found.secrets], ["a", "a.2"])

    def test_limits_errors(self) -> None:
        cases = {
            "[limits]\nmax_per_ip = 3": "f.toml: limits.max_per_ip: not a key of [limits]",
            "[limits]\nmax_connections_per_ip = 0": (
                "f.toml: limits.max_connections_per_ip: must be at least 1"
            ),
            '[limits]\nallow = ["10.0.0.0/33"]': (
                "f.toml: limits.allow: '10.0.0.0/33' is not a CIDR"
            ),
            "[limits]\ndeny = [5]": "f.toml: limits.deny: must be an array of strings",
            "[limits]\nallow_file = 5": "f.toml: limits.allow_file: must be a file name",
            "limits = 5": "f.toml: limits: must be a table",
        }
        for text, expected in cases.items():
            self.assertTrue(self.refused(text).startswith(expected), (text, self.refused(text)))

    def test_limits_single_string_and_host(self) -> None:
        limits = parse_limits({"deny": "192.0.2.7", "allow": ["10.1.2.3/8"]}, "x")
        self.assertEqual(limits.deny, (ipaddress.ip_network("192.0.2.7/32"),))
        self.assertEqual(limits.allow, (ipaddress.ip_network("10.0.0.0/8"),))

    def test_network_files(self) -> None:
        allow = Path(self.mktemp())
        allow.write_text("# office\n10.0.0.0/8\n\n  192.0.2.1  # one host\n2001:db8::/32\n")
        deny = Path(self.mktemp())
        deny.write_text("10.9.0.0/16\n")
        limits = parse_limits(
            {"allow": ["172.16.0.0/12"], "allow_file": str(allow), "deny_file": str(deny)}, "x"
        )
        self.assertEqual(
            limits.networks(),
            (
                tuple(
                    ipaddress.ip_network(n)
                    for n in ("172.16.0.0/12", "10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32")
                ),
                (ipaddress.ip_network("10.9.0.0/16"),),
            ),
        )
        # Re-read each time.
        deny.write_text("")
        self.assertEqual(limits.networks()[1], ())

    def test_network_file_errors(self) -> None:
        path = Path(self.mktemp())
        path.write_text("10.0.0.0/8\nnot-a-cidr\n")
        e = self.assertRaises(ValueError, Limits(deny_file=path).networks)
        self.assertEqual(str(e), f"{path}: line 2: 'not-a-cidr' is not a CIDR (e.g. 10.0.0.0/8)")
        missing = Path(self.mktemp())
        e = self.assertRaises(ValueError, Limits(allow_file=missing).networks)
        self.assertTrue(str(e).startswith(f"{missing}: cannot be read ("), str(e))
        path.write_bytes(b"\xff\n")
        e = self.assertRaises(ValueError, Limits(deny_file=path).networks)
        self.assertEqual(str(e), f"{path}: not UTF-8 text")

    def test_parse_functions_directly(self) -> None:
        self.assertEqual(parse_users({}, "x"), ())
        self.assertEqual(parse_limits({}, "x"), Limits())
        e = self.assertRaises(ConfigError, parse_users, {"a": {"secret": KEY_A, "x": 1}}, "w")
        self.assertTrue(str(e).startswith("w: users.a.x: not a key of a user"), str(e))


class NetworksTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        networks=st.lists(
            st.one_of(
                st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
                    lambda t: ipaddress.ip_network((t[0], t[1]), strict=False)
                ),
                st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
                    lambda t: ipaddress.ip_network((t[0], t[1]), strict=False)
                ),
            ),
            max_size=20,
        ),
        address=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    )
    def test_matches_naive(self, networks: list[Any], address: Any) -> None:
        expected = any(address in n for n in networks)
        self.assertEqual(address in _Networks(networks), expected)


class RegistryTests(SynchronousTestCase):
    def registry(self, *specs: UserSpec, **limits: Any) -> Registry:
        return Registry(specs, Limits(**limits))

    def test_user_of(self) -> None:
        (alice, bob) = users(EXAMPLE)
        registry = Registry((alice, bob), Limits())
        self.assertEqual(registry.user_of("alice"), "alice")
        self.assertEqual(registry.user_of("bob.2"), "bob")
        self.assertIsNone(registry.user_of("secret1"))
        self.assertIsNone(registry.user_of("alice.2"))
        self.assertEqual(registry.names(), ["alice", "bob"])
        self.assertIs(registry.spec("bob"), bob)

    def test_denied(self) -> None:
        registry = self.registry(deny=(ipaddress.ip_network("203.0.113.0/24"),))
        self.assertEqual(registry.check_address("203.0.113.9"), "denied")
        self.assertEqual(registry.check_address("::ffff:203.0.113.9"), "denied")
        self.assertIsNone(registry.check_address("203.0.114.9"))
        self.assertIsNone(registry.check_address("2001:db8::1"))
        self.assertIsNone(registry.check_address("not an address"))

    def test_allow(self) -> None:
        registry = self.registry(
            allow=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")),
            deny=(ipaddress.ip_network("10.9.0.0/16"),),
        )
        self.assertIsNone(registry.check_address("10.1.2.3"))
        self.assertIsNone(registry.check_address("::ffff:10.1.2.3"))
        self.assertIsNone(registry.check_address("2001:db8::5"))
        self.assertEqual(registry.check_address("10.9.0.1"), "denied")  # deny wins
        self.assertEqual(registry.check_address("192.0.2.1"), "denied")
        self.assertEqual(registry.check_address("2001:db9::5"), "denied")
        self.assertEqual(registry.check_address("garbage"), "denied")

    def test_scoped_address(self) -> None:
        registry = self.registry(allow=(ipaddress.ip_network("fe80::/10"),))
        self.assertIsNone(registry.check_address("fe80::1%eth0"))

    def test_per_ip_reached_and_lifted(self) -> None:
        registry = self.registry(max_connections_per_ip=2)
        a, b, c = object(), object(), object()
        self.assertIsNone(registry.check_address("127.0.0.2"))
        registry.attach_address(a, "127.0.0.2")
        registry.attach_address(b, "::ffff:127.0.0.2")  # the same address
        self.assertEqual(registry.address_connections("127.0.0.2"), 2)
        self.assertEqual(registry.check_address("127.0.0.2"), "per_ip")
        self.assertIsNone(registry.check_address("127.0.0.3"))
        # A check made after attaching leaves the connection itself out.
        self.assertIsNone(registry.check_address("127.0.0.2", conn=b))
        registry.attach_address(c, "127.0.0.2")
        self.assertEqual(registry.check_address("127.0.0.2", conn=c), "per_ip")
        registry.detach(c)
        registry.detach(a)
        self.assertIsNone(registry.check_address("127.0.0.2"))
        registry.attach_address(a, "127.0.0.2")
        self.assertEqual(registry.check_address("127.0.0.2"), "per_ip")
        registry.update((), Limits(max_connections_per_ip=3))
        self.assertIsNone(registry.check_address("127.0.0.2"))
        registry.update((), Limits())
        self.assertIsNone(registry.check_address("127.0.0.2"))

    def test_disabled_and_unknown(self) -> None:
        registry = self.registry(user("a", enabled=False))
        self.assertEqual(registry.check_user("a", "127.0.0.1", 0), "disabled")
        self.assertEqual(registry.check_user("nobody", "127.0.0.1", 0), "disabled")

    def test_expired_at_the_time(self) -> None:
        registry = self.registry(user("a", expires=1000.0))
        self.assertIsNone(registry.check_user("a", "127.0.0.1", 999.999))
        self.assertEqual(registry.check_user("a", "127.0.0.1", 1000.0), "expired")
        self.assertEqual(registry.check_user("a", "127.0.0.1", 5000.0), "expired")

    def test_quota(self) -> None:
        registry = self.registry(user("a", quota=100))
        self.assertIsNone(registry.check_user("a", "127.0.0.1", 0))
        self.assertEqual(registry.remaining("a"), 100)
        registry.add_bytes("a", 99)
        self.assertIsNone(registry.check_user("a", "127.0.0.1", 0))
        self.assertEqual(registry.remaining("a"), 1)
        registry.add_bytes("a", 1)
        self.assertEqual(registry.check_user("a", "127.0.0.1", 0), "quota")
        self.assertEqual(registry.remaining("a"), 0)
        registry.add_bytes("a", 50)
        self.assertEqual(registry.remaining("a"), 0)
        self.assertEqual(registry.used("a"), 150)
        # Raised on reload: let in again.
        registry.update((user("a", quota=1000),), Limits())
        self.assertIsNone(registry.check_user("a", "127.0.0.1", 0))
        self.assertEqual(registry.remaining("a"), 850)
        registry.update((user("a"),), Limits())
        self.assertIsNone(registry.remaining("a"))
        self.assertIsNone(registry.remaining("nobody"))

    def test_max_connections(self) -> None:
        registry = self.registry(user("a", max_connections=2))
        conns = [object() for _ in range(3)]
        for conn in conns[:2]:
            self.assertIsNone(registry.check_user("a", "127.0.0.1", 0))
            registry.attach_address(conn, "127.0.0.1")
            registry.attach_user(conn, "a")
        self.assertEqual(registry.connections("a"), 2)
        self.assertEqual(registry.check_user("a", "127.0.0.1", 0), "connections")
        # Attached by address only (still handshaking): not the user's yet.
        registry.attach_address(conns[2], "127.0.0.1")
        self.assertEqual(registry.connections("a"), 2)
        registry.detach(conns[0])
        self.assertIsNone(registry.check_user("a", "127.0.0.1", 0))

    def test_lowered_limit_applies_to_new_connections(self) -> None:
        registry = self.registry(user("a", max_connections=3))
        conns = [object() for _ in range(3)]
        for conn in conns:
            registry.attach_address(conn, "127.0.0.1")
            registry.attach_user(conn, "a")
        self.assertEqual(registry.update((user("a", max_connections=1),), Limits()), [])
        # Nobody cut, the counts kept, new ones refused.
        self.assertEqual(registry.connections("a"), 3)
        self.assertEqual(registry.sweep(0, [(c, "a", 0) for c in conns]), [])
        self.assertEqual(registry.check_user("a", "127.0.0.1", 0), "connections")
        registry.detach(conns[0])
        registry.detach(conns[1])
        self.assertEqual(registry.check_user("a", "127.0.0.1", 0), "connections")
        registry.detach(conns[2])
        self.assertIsNone(registry.check_user("a", "127.0.0.1", 0))

    def test_max_ips(self) -> None:
        registry = self.registry(user("a", max_ips=2))
        conns = {ip: object() for ip in ("127.0.0.2", "127.0.0.3")}
        for ip, conn in conns.items():
            self.assertIsNone(registry.check_user("a", ip, 0))
            registry.attach_address(conn, ip)
            registry.attach_user(conn, "a")
        self.assertEqual(registry.addresses("a"), 2)
        self.assertEqual(registry.check_user("a", "127.0.0.4", 0), "ips")
        # A known address may add connections.
        self.assertIsNone(registry.check_user("a", "127.0.0.2", 0))
        self.assertIsNone(registry.check_user("a", "::ffff:127.0.0.3", 0))
        second = object()
        registry.attach_address(second, "127.0.0.2")
        registry.attach_user(second, "a")
        self.assertEqual(registry.addresses("a"), 2)
        registry.detach(conns["127.0.0.2"])
        # 127.0.0.2 still has a connection.
        self.assertEqual(registry.check_user("a", "127.0.0.4", 0), "ips")
        registry.detach(second)
        self.assertEqual(registry.addresses("a"), 1)
        self.assertIsNone(registry.check_user("a", "127.0.0.4", 0))

    def test_update_reports_removed_and_disabled(self) -> None:
        registry = self.registry(user("a"), user("b", KEY_B), user("c", KEY_C, enabled=False))
        removed = registry.update((user("b", KEY_B, enabled=False), user("c", KEY_C)), Limits())
        self.assertEqual(removed, ["a", "b"])
        self.assertIsNone(registry.user_of("a"))
        self.assertEqual(registry.update((user("c", KEY_C),), Limits()), [])

    def test_update_with_a_bad_file_changes_nothing(self) -> None:
        registry = self.registry(user("a"))
        missing = Path(self.mktemp())
        self.assertRaises(ValueError, registry.update, (), Limits(deny_file=missing))
        self.assertEqual(registry.user_of("a"), "a")
        self.assertRaises(ValueError, Registry, (), Limits(deny_file=missing))

    def test_connections_of(self) -> None:
        registry = self.registry(user("a"), user("b", KEY_B))
        a1, a2, b1 = object(), object(), object()
        for conn, name in ((a1, "a"), (a2, "a"), (b1, "b")):
            registry.attach_address(conn, "127.0.0.1")
            registry.attach_user(conn, name)
        self.assertEqual(registry.connections_of("a"), [a1, a2])

    def test_attach_user_needs_an_address(self) -> None:
        registry = self.registry(user("a"))
        self.assertRaises(ValueError, registry.attach_user, object(), "a")

    def test_reattach_moves(self) -> None:
        registry = self.registry(user("a"), user("b", KEY_B))
        conn = object()
        registry.attach_address(conn, "127.0.0.1")
        registry.attach_user(conn, "a")
        registry.attach_user(conn, "b")
        self.assertEqual((registry.connections("a"), registry.connections("b")), (0, 1))
        registry.attach_address(conn, "127.0.0.2")  # detached first
        self.assertEqual(registry.connections("b"), 0)
        self.assertEqual(registry.address_connections("127.0.0.1"), 0)
        self.assertEqual(registry.address_connections("127.0.0.2"), 1)
        registry.detach(conn)
        registry.detach(conn)
        self.assertEqual(registry.counts(), {"per_ip": {}, "users": {}, "ips": {}, "attached": 0})


class SweepTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = Registry(
            (user("a", quota=1000), user("b", KEY_B, expires=500.0)), Limits()
        )
        self.a, self.b, self.plain = object(), object(), object()
        for conn, name in ((self.a, "a"), (self.b, "b"), (self.plain, None)):
            self.registry.attach_address(conn, "127.0.0.1")
            if name is not None:
                self.registry.attach_user(conn, name)

    def test_counts_differences(self) -> None:
        registry = self.registry
        self.assertEqual(registry.sweep(0, [(self.a, "a", 100), (self.plain, None, 5)]), [])
        self.assertEqual(registry.used("a"), 100)
        registry.sweep(0, [(self.a, "a", 300)])
        self.assertEqual(registry.used("a"), 300)
        registry.sweep(0, [(self.a, "a", 300)])
        self.assertEqual(registry.used("a"), 300)
        # A total that goes back (it never should) counts nothing.
        registry.sweep(0, [(self.a, "a", 200)])
        registry.sweep(0, [(self.a, "a", 350)])
        self.assertEqual(registry.used("a"), 350)
        # The final total at close counts what moved since the last sweep.
        registry.detach(self.a, 420)
        self.assertEqual(registry.used("a"), 420)
        self.assertEqual(registry.usage_snapshot(), {"a": 420})

    def test_unknown_connection_skipped(self) -> None:
        stranger = object()
        self.assertEqual(self.registry.sweep(0, [(stranger, "a", 5000)]), [])
        self.assertEqual(self.registry.used("a"), 0)

    def test_over_quota_cut_once(self) -> None:
        second = object()
        self.registry.attach_address(second, "127.0.0.2")
        self.registry.attach_user(second, "a")
        live = [(self.a, "a", 600), (second, "a", 400), (self.b, "b", 10)]
        self.assertEqual(self.registry.sweep(0, live), [(self.a, "quota"), (second, "quota")])
        self.assertEqual(self.registry.sweep(0, live), [])

    def test_expired_mid_connection(self) -> None:
        live = [(self.a, "a", 0), (self.b, "b", 0)]
        self.assertEqual(self.registry.sweep(499.5, live), [])
        self.assertEqual(self.registry.sweep(500.0, live), [(self.b, "expired")])

    def test_disabled_and_removed(self) -> None:
        removed = self.registry.update((user("a", enabled=False),), Limits())
        self.assertEqual(removed, ["a", "b"])
        live = [(self.a, "a", 0), (self.b, "b", 0), (self.plain, None, 0)]
        self.assertEqual(self.registry.sweep(0, live), [(self.a, "disabled"), (self.b, "removed")])
        # The counts stay exact until they close.
        self.assertEqual(self.registry.connections("b"), 1)
        self.registry.detach(self.b)
        self.assertEqual(self.registry.connections("b"), 0)

    def test_restore_never_lowers(self) -> None:
        self.registry.add_bytes("a", 500)
        self.registry.restore({"a": 100, "b": 70, "gone": 9, "bad": "x", "flag": True})
        self.assertEqual(self.registry.usage_snapshot(), {"a": 500, "b": 70, "gone": 9})
        registry = Registry((), None, usage={"z": 5})
        self.assertEqual(registry.used("z"), 5)


CONNS = st.integers(0, 5)
IPS = st.sampled_from(["127.0.0.2", "::ffff:127.0.0.2", "127.0.0.3", "2001:db8::1"])
NAMES = st.sampled_from(["a", "b", "c"])


def _key(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


class Counting(RuleBasedStateMachine):
    """
    Random attach, detach, traffic, sweeps and reloads against a plain model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.specs = {n: user(n, k) for n, k in zip("abc", (KEY_A, KEY_B, KEY_C), strict=True)}
        self.registry = Registry(tuple(self.specs.values()), Limits())
        self.conns = [object() for _ in range(6)]
        #: model: index -> [ip key, user or None, total, seen]
        self.model: dict[int, list[Any]] = {}
        self.usage: dict[str, int] = {}
        #: user -> enabled, for the users configured now
        self.enabled: dict[str, bool] = dict.fromkeys(self.specs, True)
        #: connections sweep has named
        self.cut: set[int] = set()

    def charge(self, i: int) -> None:
        entry = self.model[i]
        if entry[1] is not None and entry[2] > entry[3]:
            self.usage[entry[1]] = self.usage.get(entry[1], 0) + entry[2] - entry[3]
        entry[3] = max(entry[3], entry[2])

    @rule(i=CONNS, ip=IPS)
    def attach_address(self, i: int, ip: str) -> None:
        if i in self.model:
            self.model.pop(i)
        self.cut.discard(i)
        self.registry.attach_address(self.conns[i], ip)
        self.model[i] = [_key(ip), None, 0, 0]

    @rule(i=CONNS, name=NAMES)
    def attach_user(self, i: int, name: str) -> None:
        if i not in self.model:
            self.registry.attach_address(self.conns[i], "10.0.0.1")
            self.model[i] = ["10.0.0.1", None, 0, 0]
        self.registry.attach_user(self.conns[i], name)
        self.model[i][1] = name
        self.cut.discard(i)

    @rule(i=CONNS, n=st.integers(0, 10_000))
    def traffic(self, i: int, n: int) -> None:
        if i in self.model:
            self.model[i][2] += n

    @rule(i=CONNS, final=st.booleans())
    def detach(self, i: int, final: bool) -> None:
        entry = self.model.get(i)
        if entry is None:
            self.registry.detach(self.conns[i])
            return
        if final:
            self.charge(i)
        self.registry.detach(self.conns[i], entry[2] if final else None)
        del self.model[i]
        self.cut.discard(i)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def sweep(self, data: st.DataObject) -> None:
        chosen = data.draw(st.sets(st.sampled_from(sorted(self.model))))
        live = [(self.conns[i], self.model[i][1], self.model[i][2]) for i in sorted(chosen)]
        for i in chosen:
            if self.model[i][1] is not None:
                self.charge(i)
        expected = []
        for i in sorted(chosen):
            name = self.model[i][1]
            if name is None or i in self.cut:
                continue
            reason = {None: "removed", False: "disabled"}.get(self.enabled.get(name))
            if reason is not None:
                expected.append((self.conns[i], reason))
                self.cut.add(i)
        assert self.registry.sweep(0, live) == expected

    @rule(keep=st.sets(NAMES), disable=st.sets(NAMES))
    def reload(self, keep: set[str], disable: set[str]) -> None:
        specs = tuple(
            user(n, s.secrets[0].hex(), enabled=n not in disable)
            for n, s in self.specs.items()
            if n in keep
        )
        before = {n for n, on in self.enabled.items() if on}
        self.enabled = {n: n not in disable for n in self.specs if n in keep}
        after = {n for n, on in self.enabled.items() if on}
        assert self.registry.update(specs, Limits()) == sorted(before - after)

    @invariant()
    def counts_match(self) -> None:
        per_ip: dict[str, int] = {}
        users_: dict[str, int] = {}
        ips: dict[str, dict[str, int]] = {}
        for ip, name, _total, _seen in self.model.values():
            per_ip[ip] = per_ip.get(ip, 0) + 1
            if name is not None:
                users_[name] = users_.get(name, 0) + 1
                held = ips.setdefault(name, {})
                held[ip] = held.get(ip, 0) + 1
        counts = self.registry.counts()
        assert counts == {
            "per_ip": per_ip,
            "users": users_,
            "ips": ips,
            "attached": len(self.model),
        }, (counts, per_ip, users_, ips)
        for name in "abc":
            assert self.registry.connections(name) == users_.get(name, 0)
            assert self.registry.addresses(name) == len(ips.get(name, {}))
        for ip in ("127.0.0.2", "127.0.0.3", "2001:db8::1", "10.0.0.1"):
            assert self.registry.address_connections(ip) == per_ip.get(ip, 0)

    @invariant()
    def usage_matches(self) -> None:
        assert self.registry.usage_snapshot() == self.usage


class CountingTests(SynchronousTestCase):
    def test_counts_exact(self) -> None:
        test = Counting.TestCase
        test.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
        test("runTest").runTest()
