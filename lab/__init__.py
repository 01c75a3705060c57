"""The lab: a rack of Raspberry Pis stood in for by network namespaces on one machine.

`netns` holds the network primitives (bridge, namespaces, teardown), `cluster.Lab` runs a
real coordinator and one real agent per namespace, `cli` is `picoord-lab`. Needs root.
"""

from picoord.lab.cluster import Lab
from picoord.lab.netns import LabError, LabNeedsRoot

__all__ = ["Lab", "LabError", "LabNeedsRoot"]
