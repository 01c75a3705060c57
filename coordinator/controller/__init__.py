"""The workload controller: the shell that runs placement, rollouts and reconciliation."""
