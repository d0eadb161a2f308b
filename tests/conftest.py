"""Shared pytest fixtures: the session-wide network-namespace lab.

The `lab` fixture brings the lab (lab/) up once per test session and down at the end, also when
tests fail or the run is interrupted. Integration tests need root; without it they fail loudly
(never skip: a skipped integration test would count as passing). LAB_ID in the environment
selects a private lab instance (namespaces isk<LAB_ID>-*), so parallel runs do not clash.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

# Property tests: the same examples on every run by default, so that `make test` (and CI) is a
# verdict on the change, not on the day's luck; HYPOTHESIS_PROFILE=explore draws new examples
# (more of them) to look for new failures, as bench/fuzz_soak.py does for the daemon.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=1000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# The repository root first on sys.path: `lab` is a plain directory of the checkout, and an
# older editable install may map it as a namespace package (then `from lab import Lab` fails).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

if TYPE_CHECKING:
    from lab.core import Lab

# Programs the lab runs; a missing one is a setup defect, reported by name.
REQUIRED_PROGRAMS = ("ip", "named", "dnssec-keygen", "dnssec-signzone", "dnssec-dsfromkey",
                     "tsig-keygen", "unbound", "unbound-control", "dig", "nsupdate", "tcpdump",
                     "ping", "getent", "swanctl", "/usr/lib/ipsec/charon")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ is an integration test, marked or not."""
    for item in items:
        if "integration" in Path(str(item.path)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Give the root logger back as the test found it. A test that runs the daemon's
    setup_logging (or cli.main) in-process leaves a handler on the stderr pytest captured for
    that test; once closed, every later log line printed "--- Logging error ---"."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def _prepare_containers(request: pytest.FixtureRequest) -> None:
    """Build the service tests' Debian tree now if they will run and it is missing: once the
    lab is up, it blackholes the package registries and the build cannot download."""
    if not any(item.get_closest_marker("nspawn") for item in request.session.items):
        return
    from lab import nspawn

    if not nspawn.is_built():
        try:
            nspawn.ensure()
        except Exception as exc:  # the tests that need it fail with the reason
            print(f"conftest: cannot build the container tree: {exc}", file=sys.stderr)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The lab, up for the whole session; torn down at the end even on failure."""
    if os.geteuid() != 0:
        pytest.fail(
            "integration tests need root: the lab creates network namespaces. "
            "Run as root (e.g. `sudo make test`), or deselect them with -m 'not integration'.",
            pytrace=False,
        )
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p, path=path) is None]
    if missing:
        pytest.fail(f"lab programs missing: {', '.join(missing)} (run `bash lab/setup.sh`)",
                    pytrace=False)
    from lab.core import Lab

    _prepare_containers(request)
    instance = Lab()
    instance.up()
    try:
        yield instance
    finally:
        instance.down()
