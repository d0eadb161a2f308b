"""The Provisioner's parts (resolver/provision.py holds the Provisioner and its Rules): books,
setup, reconcile, repair, and the watch over charon.
"""
