"""The write-ahead log: segment files of CRC32C-framed records (see :mod:`.format`)."""

from .decoder import WalRecord
from .log import Wal, WalTail
from .repair import TornTailRepair

__all__ = ["TornTailRepair", "Wal", "WalRecord", "WalTail"]
