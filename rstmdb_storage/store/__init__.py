"""The LMDB side of the store: the environment, its meta table."""
