"""Shipping the WAL and snapshots to an S3-compatible object store, and restoring from it.

:mod:`.objects` talks to the store (boto3, imported only when used: ``pip install
'rstmdb-storage[s3]'``); :mod:`.layout` names the objects; :mod:`.bucket_restore` builds a data
directory from a bucket; :mod:`.shipping` ships an open store's sealed segments and snapshots.
"""
