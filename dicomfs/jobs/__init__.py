"""Jobs: long operations (exports to other archives) that survive restarts and failures.

``model`` says what a job is, ``storage`` keeps jobs in ``<store>/jobs`` (LMDB) with leases so
several processes can share them, ``runner`` runs them with retries and backoff, ``schedule``
parses dcm4chee-style time windows, ``stowrs`` and ``transcode`` send instances to a DICOMweb
archive, and ``export`` is the job kind that does so.
"""
