"""PoolKey.state: which side may use a key of the pool. Shared by the models and the statements of every engine."""

OURS = 0         # free for masters of this KME
PEERS = 1        # belongs to the other direction of the link: only the peer KME activates it
RESERVED = 2     # claimed by an activation at the peer KME whose answer is pending
UNCONFIRMED = 3  # held here, not yet known to be held by the peer: nobody uses it
