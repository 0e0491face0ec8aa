"""The key store: the only code that writes key rows and link counters.

Each public function is one write transaction: it happens entirely or not at
all, and keeps every link's counters exact
(ingested = available + reserved + peer_held + unconfirmed + delivered +
discarded + set_aside).

- common: value types, counters, reads
- intake: key files into the pools
- local: keys for SAEs of this KME, fetch by key ID, expiry
- outgoing: activations this KME asks of a peer KME
- incoming: activations a peer KME asks of this KME
- progress: which keys both ends of a link hold (progress exchange, set-aside)
- leases: keys moved between the two directions of a link
- interop: keys foreign KMSs pass us (ETSI GS QKD 020), their voids, the acknowledgements owed
- handed_out: keys leave only from a database that has not gone back in time
- recovery: a database restored from a backup made safe again
"""
