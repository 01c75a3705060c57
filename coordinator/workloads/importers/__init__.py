"""Readers of the three workload formats into ServiceSpec: picoord's own, Compose, Kubernetes."""
