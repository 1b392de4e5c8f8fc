"""The store: instance files on disk and their SQLite index, the single source of truth."""
