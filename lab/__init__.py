"""The lab: a rack of Raspberry Pis stood in for by network namespaces on one machine.

`netns` holds the network primitives (bridge, namespaces, teardown), `sandbox` gives each Pi
its own mount namespace and daemons (dockerd, glusterd), `cluster.Lab` runs a
real coordinator and one real agent per namespace, `cli` is `picoord-lab`. Needs root.
"""

from picoord.lab.cluster import Lab
from picoord.lab.netns import LabError, LabNeedsRoot
from picoord.lab.sandbox import PiRack, PiSandbox

__all__ = ["Lab", "LabError", "LabNeedsRoot", "PiRack", "PiSandbox"]
