"""Cluster-scale execution on Ray: distributed training (Ray Train) and tensor-parallel worker groups."""
