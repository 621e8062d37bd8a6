"""The write-ahead log: segment files of CRC32C-framed records (see :mod:`.format`)."""

from .decoder import FramedRecord
from .log import Wal, WalTail
from .repair import TornTailRepair

__all__ = ["FramedRecord", "TornTailRepair", "Wal", "WalTail"]
