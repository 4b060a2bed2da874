"""`fleet up` on one host: the arbiter loop, slot states, control socket and child link."""
