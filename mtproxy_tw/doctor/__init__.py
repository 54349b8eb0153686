"""
``mtproxy-tw doctor``: checks of this host and the configuration, taking the
options of ``twist mtproxy``.

Each check is a small function answering :class:`~.result.Result` lines
(:mod:`.local`: listen endpoints, state directory, open-file limit;
:mod:`.telegram`: config downloads, clock, DCs, middle proxies;
:mod:`.address`: the external address and the fake-TLS domains' DNS;
:mod:`.tls`: the mask host); :mod:`.runner` runs them all at once.
"""

from __future__ import annotations

from mtproxy_tw.doctor.result import Result, Status, exit_status
from mtproxy_tw.doctor.runner import DoctorOptions, main, run

__all__ = ["DoctorOptions", "Result", "Status", "exit_status", "main", "run"]
