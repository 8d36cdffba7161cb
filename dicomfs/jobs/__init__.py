"""Jobs: long operations (exports to other archives, peer transfers) that survive restarts and failures.

``model`` says what a job is, ``storage`` keeps jobs in ``<store>/jobs`` (LMDB) with leases so
several processes can share them, ``runner`` runs them with retries and backoff, ``schedule``
parses dcm4chee-style time windows, ``stowrs`` and ``transcode`` send instances to a DICOMweb
archive and ``export`` is the job kind that does so, ``xnat`` (with ``zipnames``) sends zip
batches to XNAT, and ``service`` builds a process's runner with every executor (peer transfers,
``send`` and ``pull``, live in ``dicomfs.transfers``). ``routes`` turns new instances into jobs.
"""
