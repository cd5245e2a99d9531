"""The trace store and its readers: the SQLite schema, the writer and its rollups, readers, loading, liveness."""
