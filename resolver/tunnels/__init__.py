"""Tunnels at the edge: intents, the backend interface and its implementations, their config.

The Provisioner (``resolver.provision``) decides *when*; this package says *what* and *how*:
the intents and tunnel specs (``intents``, pure data), the backend interface with the composite
and the factory (``backend``), strongSwan over VICI (``vici``), kernel XFRM shunts over netlink
(``xfrm``), a logging dry run (``dryrun``), and the [provision]/[identity] tables (``config``).
The Provisioner's state file is written by ``resolver.statefile``, shared with the endpoints.
"""
