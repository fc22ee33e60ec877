"""cost-autoscaler: replicas per service from load, SRE pins, and a cost ledger per run."""
