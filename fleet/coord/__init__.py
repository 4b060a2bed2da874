"""Coordination through etcd: the client wrapper, the key layout, sessions, election,
assignment, ownership, membership and the local view of a fleet."""
