"""Angel-PTM (VLDB 2023): model states in pages over GPU, host memory and SSD, prefetched and evicted by the
known access order, with a lock-free CPU update overlapping the next step."""
