"""The KME's domain.

The ETSI methods, key activation between KMEs, the error vocabulary, and the
entropy of key material.
"""
