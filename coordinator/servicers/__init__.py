"""Thin gRPC servicers: they translate between the wire and the Cluster, nothing more."""
