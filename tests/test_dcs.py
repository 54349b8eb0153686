from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire.dcs import Address, DCTable, parse_address, parse_dc_override


class DCTableTests(SynchronousTestCase):
    def test_builtin(self) -> None:
        table = DCTable()
        self.assertEqual(table.lookup(2), (Address("149.154.167.51", 443), True))
        self.assertEqual(table.lookup(-4), (Address("149.154.167.91", 443), True))
        self.assertEqual(DCTable(prefer_ipv6=True).lookup(1)[0].host, "2001:b28:f23d:f001::a")

    def test_unknown_goes_to_default(self) -> None:
        self.assertEqual(DCTable().lookup(10002), (Address("149.154.167.51", 443), False))
        table = DCTable({2: Address("127.0.0.1", 1)})
        self.assertEqual(table.lookup(7), (Address("127.0.0.1", 1), False))

    def test_override_is_per_id(self) -> None:
        """
        Overriding DC 2 leaves its media twin -2 on the built-in address.
        """
        table = DCTable({2: Address("127.0.0.1", 1)})
        self.assertEqual(table.lookup(2)[0], Address("127.0.0.1", 1))
        self.assertEqual(table.lookup(-2)[0], Address("149.154.167.51", 443))


class ParseTests(SynchronousTestCase):
    def test_override(self) -> None:
        self.assertEqual(parse_dc_override("-2=[::1]:443"), (-2, Address("::1", 443)))
        self.assertEqual(parse_dc_override("4=dc.example:8443"), (4, Address("dc.example", 8443)))

    def test_bad(self) -> None:
        for text in (
            "2",
            "x=1.2.3.4:1",
            "0=1.2.3.4:5",
            "2=1.2.3.4",
            "2=1.2.3.4:0",
            "2=[zz]:1",
            "99999=a:1",
            "2=::1:443",
        ):
            self.assertRaises(ValueError, parse_dc_override, text)

    def test_address_default_port(self) -> None:
        self.assertEqual(parse_address("example.com", 443), Address("example.com", 443))
        self.assertEqual(str(Address("::1", 5)), "[::1]:5")
