"""Endpoints known by name (``autosp add``).

A pure core, the asyncio manager, and the control socket autosp talks to.
"""
