"""Cluster-scale execution on Ray: distributed training (Ray Train) and tensor-parallel worker groups."""

import os

# Before anything imports Ray: keep a local Ray on 127.0.0.1 instead of the routable address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
