"""Shipping the WAL and snapshots to an S3-compatible object store, following it, and restoring
from it (docs/replication.md tells the whole story).

:mod:`.objects` talks to the store (boto3, imported only when used: ``pip install
'rstmdb-storage[s3]'``); :mod:`.layout` names the objects; :mod:`.lease` lets one writer ship
per store id, and numbers its epochs; :mod:`.shipping` ships an open store's sealed segments
and snapshots (``StorageConfig.replica_url``); :mod:`.following` applies them on a replica
(``StorageConfig.replica_of``); :mod:`.bucket_restore` builds a data directory from a bucket
(``Storage.restore("s3://...", target)``).

Example::

    primary = Storage.open(StorageConfig(data_dir="/var/lib/rstmdb", replica_url="s3://b/p"))
    replica = Storage.open("/var/lib/replica", replica_of="s3://b/p")
    Storage.restore("s3://b/p", "/var/lib/restored", seq=52_117)
"""
