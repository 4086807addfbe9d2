"""Moving training state off the device while it is not needed.

- `memo`: MEMO's token-wise activation swapping to host memory with saved-tensor hooks, token-wise
  recompute of the rest, and the preallocated arena the memory plan sizes.
"""
