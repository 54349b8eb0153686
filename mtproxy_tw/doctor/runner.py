"""
``mtproxy-tw doctor``: the options of ``twist mtproxy``, every check run at
once, one line per check in a fixed order, exit status 1 on any ``FAIL``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.task import react
from twisted.python import usage

from mtproxy_tw.doctor.address import (
    Public,
    check_domains,
    check_external,
    external_address,
    public_address,
)
from mtproxy_tw.doctor.context import Context, shared
from mtproxy_tw.doctor.local import check_listen, check_open_files, check_state_dir
from mtproxy_tw.doctor.result import Result, Status, exit_status
from mtproxy_tw.doctor.sharedstate import check_shared_state
from mtproxy_tw.doctor.telegram import (
    KINDS,
    Download,
    check_clock,
    check_dcs,
    check_download,
    check_middle_proxies,
    download,
    middle_configs,
)
from mtproxy_tw.doctor.tls import check_mask
from mtproxy_tw.tap import Options, settings_from_options

__all__ = ["DoctorOptions", "main", "run"]


class DoctorOptions(Options):
    """
    ``twist mtproxy``'s options, for the checks.
    """

    synopsis = "Usage: mtproxy-tw doctor [options]"
    longdesc = (
        "Checks this host and the configuration before the proxy runs: one line per "
        "check (OK, WARN or FAIL); the exit status is 1 if any check fails. It takes "
        "the options of twist mtproxy, so the same command line or --config file can be "
        "given; every address it contacts comes from them."
    )


def _context(reactor: Any, options: Options, **given: Any) -> Context:
    settings = settings_from_options(options, tuple(options["secrets"]))
    timeout = float(options["connect-timeout"])
    extra = {k: v for k, v in given.items() if v is not None}
    return Context(reactor, options, settings, options["middle"], timeout, **extra)


async def _downloads(ctx: Context) -> list[Download]:
    kinds = list(KINDS) if ctx.middle is not None else ["config"]
    found: list[Download] = await gatherResults(
        [ensureDeferred(download(ctx, kind)) for kind in kinds]
    )
    return found


async def _middle_proxies(ctx: Context, answers: Deferred[list[Download]]) -> list[Result]:
    v4, v6, source = middle_configs(ctx.options["state-dir"], await answers)
    return await check_middle_proxies(ctx, v4, v6, source)


async def _domains(ctx: Context, external: Deferred[Public] | None) -> list[Result]:
    if not ctx.settings.tls_enabled:
        return []
    public = await public_address(ctx, await external if external is not None else None)
    return await check_domains(ctx, public)


async def _listen(ctx: Context) -> list[Result]:
    return [await check_listen(ctx.reactor, d) for d in ctx.options["listen"]]


def _local(ctx: Context) -> list[Result]:
    middle = ctx.middle
    return [
        check_state_dir(ctx.options["state-dir"]),
        check_open_files(
            ctx.open_file_limits,
            ctx.settings.max_connections,
            middle=middle is not None,
            pool_max=middle.pool_max if middle is not None else 0,
            listeners=len(ctx.options["listen"]),
        ),
    ]


def _steps(ctx: Context) -> list[Deferred[list[Result]]]:
    """
    Every check, started at once, in the order they are told.
    """

    def start(coro: Coroutine[Any, Any, list[Result]]) -> Deferred[list[Result]]:
        return ensureDeferred(coro)

    answers = ensureDeferred(_downloads(ctx))
    steps = [start(_listen(ctx)), succeed(_local(ctx))]
    steps.append(start(check_shared_state(ctx.reactor, ctx.options["shared-state"], ctx.timeout)))
    external: Deferred[Public] | None = None
    if ctx.middle is not None:
        external = ensureDeferred(external_address(ctx))
        steps.append(shared(answers).addCallback(lambda got: [check_download(a) for a in got]))
    steps.append(shared(answers).addCallback(lambda got: [check_clock(ctx, got)]))
    steps.append(start(check_dcs(ctx)))
    if ctx.middle is not None and external is not None:
        steps.append(start(_middle_proxies(ctx, shared(answers))))
        steps.append(shared(external).addCallback(lambda public: [check_external(public)]))
    steps.append(start(check_mask(ctx)))
    steps.append(start(_domains(ctx, shared(external) if external is not None else None)))
    return steps


async def run(
    reactor: Any,
    options: Options,
    write: Callable[[str], None] | None = None,
    *,
    http_client: Any = None,
    open_file_limits: Callable[[], tuple[int, int]] | None = None,
) -> list[Result]:
    """
    Run every check that applies to ``options``; ``write`` gets each line as
    soon as it and those before it are known.

    :param http_client: a treq ``HTTPClient`` (default: one that verifies
        certificates).
    :param open_file_limits: ``(soft, hard)`` instead of the process's own.
    """
    ctx = _context(reactor, options, http_client=http_client, open_file_limits=open_file_limits)
    results: list[Result] = []
    for step in _steps(ctx):
        try:
            found = await step
        except Exception as e:
            # A bug in a check must still leave a line, and the exit status.
            found = [Result(Status.FAIL, "doctor", f"a check stopped: {e!r}")]
        for result in found:
            results.append(result)
            if write is not None:
                write(result.line())
    return results


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _main(reactor: Any, options: Options) -> None:
    status = exit_status(await run(reactor, options, _write))
    if status:
        raise SystemExit(status)


def main(argv: Sequence[str]) -> int:
    """
    ``mtproxy-tw doctor ARGS``: 0 when no check fails, 1 when one does, 2
    for a bad option (one line on stderr naming it).
    """
    options = DoctorOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        sys.stderr.write(f"mtproxy-tw doctor: {e}\n")
        return 2
    react(_main, (options,))
