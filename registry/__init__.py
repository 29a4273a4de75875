"""The subnet registry: flannel's network config and leases, and where they are kept."""
