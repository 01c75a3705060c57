"""Errors the agent's command line reports as such (importable without the heavy modules)."""


class JoinError(RuntimeError):
    """Joining failed; the message says why and what to do."""
