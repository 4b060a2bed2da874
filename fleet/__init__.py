"""fleet: a fleet of worker processes that split a fixed set of segments through etcd."""

from fleet.handler import LostOwnership, SegmentContext

__all__ = ["LostOwnership", "SegmentContext"]
__version__ = "0.1.0"
