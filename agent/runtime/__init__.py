"""The agent's container runtime: replicas as plain data (model), health (health), dockerd (engine)."""
