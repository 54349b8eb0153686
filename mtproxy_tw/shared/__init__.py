"""
State that must hold across the whole proxy: every worker process of one
host (:mod:`~mtproxy_tw.shared.amp`), or every host of a fleet
(:mod:`~mtproxy_tw.shared.redis`). :mod:`~mtproxy_tw.shared.base` says
what the state answers; :mod:`~mtproxy_tw.shared.local` is the embedded
default, which needs no server.
"""
