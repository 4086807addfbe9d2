"""Paged model states (Angel-PTM): fixed-size pages over a device pool with a hard budget, a host pool and
checksummed page files on SSD, fetched in the scheduler's order and stepped by a CPU optimizer."""
