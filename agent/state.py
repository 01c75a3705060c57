"""What `picoord-agent join` leaves in the agent's state dir for `picoord-agent run`.

node.key is written 0600 before any byte of it; the enrollment is recorded last, so a
join that fails half-way leaves no enrollment that `run` would try to use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from picoord.common.files import write_atomically

ENROLLMENT_FILE = "enrollment.json"


class NotEnrolled(RuntimeError):
    pass


@dataclass(frozen=True)
class Enrollment:
    node_name: str
    coordinator: str  # HOST:PORT of the mutual-TLS session endpoint
    enrolled_at: float


@dataclass(frozen=True)
class AgentFiles:
    state_dir: Path

    @property
    def key(self) -> Path:
        return self.state_dir / "node.key"

    @property
    def certificate(self) -> Path:
        return self.state_dir / "node.crt"

    @property
    def ca(self) -> Path:
        return self.state_dir / "ca.crt"

    @property
    def enrollment_path(self) -> Path:
        return self.state_dir / ENROLLMENT_FILE

    def load(self) -> Enrollment:
        try:
            data = json.loads(self.enrollment_path.read_text())
            enrollment = Enrollment(**data)
            for path in (self.key, self.certificate, self.ca):
                if not path.exists():
                    raise FileNotFoundError(path)
        except FileNotFoundError:
            raise NotEnrolled(
                f"this node is not enrolled (nothing usable in {self.state_dir}): "
                "run the `picoord-agent join ...` command printed by `coordctl token create`"
            ) from None
        except (ValueError, TypeError) as error:
            raise NotEnrolled(f"{self.enrollment_path} is damaged ({error}): join again") from None
        return enrollment

    def save(self, enrollment: Enrollment, key_pem: bytes, certificate_pem: bytes, ca_pem: bytes) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self.key, key_pem, 0o600)
        write_atomically(self.certificate, certificate_pem, 0o644)
        write_atomically(self.ca, ca_pem, 0o644)
        write_atomically(self.enrollment_path, json.dumps(asdict(enrollment), indent=2).encode(), 0o644)
