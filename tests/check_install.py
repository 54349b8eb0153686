"""
Checks the installed package, run in isolated mode outside the source tree:
the plugin is found through site-packages, with no plugin-cache complaint.
"""

from __future__ import annotations

import sys
import warnings

from twisted.logger import globalLogPublisher


def main() -> int:
    complaints: list[str] = []
    globalLogPublisher.addObserver(
        lambda event: complaints.append(str(event.get("log_format") or event))
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        from twisted import plugins

        makers = {p.tapname: p for p in getPlugins(IServiceMaker, plugins)}
        makers = {p.tapname: p for p in getPlugins(IServiceMaker, plugins)}
    maker = makers.get("mtproxy")
    if maker is None:
        sys.stderr.write("the mtproxy plugin was not found\n")
        return 1
    import mtproxy_tw

    if "site-packages" not in (mtproxy_tw.__file__ or ""):
        sys.stderr.write(f"mtproxy_tw imported from {mtproxy_tw.__file__}, not the install\n")
        return 1
    options = maker.options()
    options.parseOptions(["--secret", "00" * 16])
    problems = [str(w.message) for w in caught] + [c for c in complaints if "cache" in c.lower()]
    if problems:
        sys.stderr.write("plugin loading complained: " + "; ".join(problems) + "\n")
        return 1
    sys.stdout.write("installed plugin found: mtproxy\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
