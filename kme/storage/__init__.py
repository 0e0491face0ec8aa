"""Storage.

The database handle and transactions, the tables, what is specific to SQLite,
and the key store (the only writer of key rows).
"""
