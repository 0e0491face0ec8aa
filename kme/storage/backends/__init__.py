"""The database engines the KME runs on, one module each."""
