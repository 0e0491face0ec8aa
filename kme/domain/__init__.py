"""The KME's domain: the ETSI methods, key activation between KMEs, the error vocabulary, and the entropy of key material."""
