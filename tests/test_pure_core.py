"""The pure core imports only pure modules (DESIGN.md, "The three rings"): importing a core
module must not load the asyncio layer or an edge (sockets, charon, netlink, the clock).

Each module is imported in a fresh interpreter, so what another test imported does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE = ("resolver.validator.types", "resolver.validator.response", "resolver.policy",
        "resolver.ipseckey", "resolver.answer", "resolver.rrsets", "resolver.tunnels.intents",
        "resolver.endpoints.core", "resolver.endpoints.protocol", "resolver.namedconf",
        "resolver.configtable", "resolver.cache", "resolver.iterate.core",
        "resolver.iterate.infra", "resolver.iterate.hints", "resolver.logs.event",
        "resolver.tunnels.statedoc", "resolver.responder.core", "resolver.responder.charonlog",
        "resolver.wire.parse", "resolver.wire.render", "resolver.wire.patch",
        "resolver.validator.names")
# Everything the core may import: itself, the package markers, the errors, the validator.
ALLOWED = set(PURE) | {"resolver", "resolver.errors", "resolver.endpoints", "resolver.tunnels",
                       "resolver.responder", "resolver.iterate", "resolver.logs", "resolver.wire",
                       "resolver.validator"}  # packages: their __init__ holds only a docstring


@pytest.mark.parametrize("module", PURE)
def test_core_module_loads_no_impure_module(module: str) -> None:
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('resolver'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = set(json.loads(out))
    impure = {m for m in loaded - ALLOWED if not m.startswith("resolver.validator.")}
    assert impure == set(), f"{module} loads {sorted(impure)}"
