"""The KME's domain.

The ETSI methods, key activation between KMEs, how the two KMEs of a link
share its keys, relays through trusted nodes, and the entropy of key material.
"""
