"""
Reloading the secrets: the file format, the service, and SIGHUP.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.services.reload import SecretsReloader
from mtproxy_tw.wire.secrets import Secret, SecretError, parse_secret, parse_secrets_text
from tests.test_integration import CLASSIC, SECURE, ProxyHarness, _payload

reactor: Any = _reactor

ALICE = CLASSIC
BOB = SECURE
CAROL = parse_secret("carol=dd" + "c4" * 16, "x")


class FileFormatTests(SynchronousTestCase):
    def test_lines(self) -> None:
        text = f"# users\nalice={ALICE.hex()}\n\n  {BOB.hex()}  # no name\n"
        secrets = parse_secrets_text(text)
        self.assertEqual(
            [(s.name, s.key) for s in secrets], [("alice", ALICE.key), ("file2", BOB.key)]
        )

    def test_errors_name_the_line(self) -> None:
        e = self.assertRaises(SecretError, parse_secrets_text, f"a={ALICE.hex()}\nnonsense\n")
        self.assertTrue(str(e).startswith("line 2:"))
        e = self.assertRaises(SecretError, parse_secrets_text, f"a={ALICE.hex()}\na={BOB.hex()}\n")
        self.assertIn("twice", str(e))


def write(path: Path, *secrets: Secret) -> None:
    path.write_text("".join(f"{s.name}={s.hex()}\n" for s in secrets))


class ReloadTests(ProxyHarness):
    async def setup_reloader(self, *secrets: Secret) -> tuple[SecretsReloader, Path]:
        path = Path(self.mktemp())
        write(path, *secrets)
        await self.start(secrets=secrets)
        announced: list[str] = []
        reloader = SecretsReloader(
            self.service, reactor, (), path, lambda s: announced.extend(x.name for x in s)
        )
        self.announced = announced
        return reloader, path

    async def echo(self, secret: Secret) -> None:
        client = await self.client(secret)
        payload = _payload(1000)
        self.assertEqual(await self.within(client.request(payload)), payload)

    def test_revoke_and_add(self) -> None:
        """
        A removed user's connections close; others carry on; a new user can
        connect at once, and the removed one no longer can.
        """

        async def run() -> None:
            reloader, path = await self.setup_reloader(ALICE, BOB)
            alice = await self.client(ALICE)
            bob = await self.client(BOB)
            payload = _payload(100)
            self.assertEqual(await self.within(alice.request(payload)), payload)
            self.assertEqual(await self.within(bob.request(payload)), payload)
            write(path, ALICE, CAROL)
            self.assertTrue(reloader.reload())
            await self.within(bob.lost)
            self.assertEqual(await self.within(alice.request(payload)), payload)
            await self.echo(CAROL)
            self.assertEqual(self.announced, ["carol"])
            late = await self.client(BOB)
            await self.within(late.lost)
            self.assertEqual(self.stats.rejected["bad-init"], 1)

        return self.run_async(run())

    def test_bad_file_changes_nothing(self) -> None:
        async def run() -> None:
            reloader, path = await self.setup_reloader(ALICE)
            path.write_text("alice=zz\n")
            self.assertFalse(reloader.reload())
            path.write_text("")
            self.assertFalse(reloader.reload())
            path.unlink()
            self.assertFalse(reloader.reload())
            await self.echo(ALICE)

        return self.run_async(run())

    def test_emptied_file_beside_a_secret_warns(self) -> Deferred[None]:
        """
        Emptying the file while a --secret is given removes every file user
        and says so in a warning; the --secret users carry on.
        """

        async def run() -> None:
            path = Path(self.mktemp())
            write(path, BOB)
            await self.start(secrets=(ALICE, BOB))
            reloader = SecretsReloader(self.service, reactor, (ALICE,), path, lambda s: None)
            bob = await self.client(BOB)
            payload = _payload(100)
            self.assertEqual(await self.within(bob.request(payload)), payload)
            events: list[LogEvent] = []
            observer = cast(ILogObserver, events.append)
            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
            path.write_text("# everyone out\n")
            self.assertTrue(reloader.reload())
            await self.within(bob.lost)
            await self.echo(ALICE)
            warnings = [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]
            self.assertEqual(len(warnings), 1, warnings)
            self.assertIn(f"{path} lists no secrets", warnings[0])
            self.assertIn("all 1 of its users were removed", warnings[0])
            text = " ".join(formatEvent(e) for e in events)
            self.assertNotIn(BOB.key.hex(), text)
            self.assertNotIn(ALICE.key.hex(), text)

        return self.run_async(run())

    def test_sighup(self) -> None:
        """
        SIGHUP makes the running reactor reload; the previous handler comes back.
        """

        async def run() -> None:
            reloader, path = await self.setup_reloader(ALICE)
            before = signal.getsignal(signal.SIGHUP)
            reloader.startService()
            self.addCleanup(reloader.stopService)
            write(path, ALICE, CAROL)
            os.kill(os.getpid(), signal.SIGHUP)
            await self.until(lambda: self.announced == ["carol"], "the reload")
            await self.echo(CAROL)
            reloader.stopService()
            self.assertEqual(signal.getsignal(signal.SIGHUP), before)

        return self.run_async(run())
