"""Peer transfers: moving instances between two dicomfs servers over HTTP(S) (``docs/transfers.md``).

``protocol`` is the pure part (buckets, planning, byte ranges), ``receiving`` commits what
arrives into a store, ``sending`` reads buckets out of one and resolves selections, ``client``
talks to a peer's ``/transfers/`` endpoints (served by ``bridge.transfers``), and ``jobs`` holds
the ``send`` and ``pull`` executors the job engine runs.
"""
