"""Smartcards through PC/SC (pcscd, over pyscard): readers and their events
(:mod:`drivers.pcsc.readers`), the PIV card application (:mod:`drivers.pcsc.piv`) and what
can go wrong, with messages for people (:mod:`drivers.pcsc.errors`). A driver: no policy."""
