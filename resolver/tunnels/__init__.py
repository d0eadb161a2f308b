"""Tunnels at the edge: intents, the backend interface and its implementations, the state store.

The Provisioner (``resolver.provision``) decides *when*; this package says *how*: strongSwan over
VICI (``vici``), kernel XFRM shunts over netlink (``xfrm``), a logging dry run (``dryrun``).
"""
