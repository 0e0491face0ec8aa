"""The names of the facts kept in kme_meta, made with the database (kme.storage.schema.ensure_schema)."""

# The database's random ID (the key folders and the peer KME know it).
DATABASE_ID = "database_id"
# The secret of the keyed fingerprints that refuse a key ingested twice.
FINGERPRINT_SECRET = "fingerprint_secret"
# The data-encryption key, wrapped by the key-encryption key (kme.storage.kek).
DATA_KEY = "data_key"
# For an hour after flask rotate-kek: the data key wrapped by the previous KEK, after its expiry (8 bytes, big-endian
# epoch seconds), so that processes still configured with it keep working while the configuration changes.
DATA_KEY_PREVIOUS = "data_key_previous"
# Present while pool keys written by a KME before encryption at rest remain in clear (flask encrypt-db).
CLEAR_POOL = "clear_pool"
