"""
``mtproxy-tw probe``: a censor's active probes, sent to the proxy and to
the site it fronts, and whether each answer tells them apart.

- :mod:`.battery` (pure): the probes, as the bytes each sends;
- :mod:`.compare` (pure): what one probe saw (:class:`Answer`) and when
  two answers count as the same;
- :mod:`.run`: the probes over TCP, on Twisted (:func:`run_battery`);
- :mod:`.command`: the ``probe`` subcommand of ``mtproxy-tw``.

Nothing is imported here, so the command line starts without Twisted.
"""
