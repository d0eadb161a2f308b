"""The network-namespace lab: private signed DNS, a validating Unbound and strongSwan peers.

`from lab import Lab, HOSTS`; lab/topology.py holds the data, lab/core.py the API.
"""

from lab.core import CommandFailed, Lab
from lab.net import LabError
from lab.topology import HOSTS, PEERS, ZONES, Host, KeyKind, Zone

__all__ = ["HOSTS", "PEERS", "ZONES", "CommandFailed", "Host", "KeyKind", "Lab", "LabError", "Zone"]
