"""Step caching: skip transformer blocks at steps where their output barely changes.

`DBCache` decides per step from a cheap probe of the first blocks; `LeMiCa` follows a step plan made offline.
Both skip blocks through `block_skip.SkippableSpan` and replay a cached residual.
"""

from .dbcache import DBCache
from .lemica import LeMiCa

__all__ = ["DBCache", "LeMiCa"]
