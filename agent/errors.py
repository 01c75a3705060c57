"""Errors the agent's command line reports as such (importable without the heavy modules)."""


class JoinError(RuntimeError):
    """Joining failed; the message says why and what to do. `transient`: the same join may
    work later by itself (the coordinator out of reach, the clock not yet set, too many
    attempts), as opposed to a refusal only a new token or file can fix."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
