# The two commands a newcomer runs (as root, on Debian 12): `make demo` and `make test`.
# Both install what they need first (lab/setup.sh is idempotent).
PY := .venv/bin/python
SHELL := /bin/bash

.PHONY: setup test unit integration demo lint lab-up lab-down bench clean install install-deps \
	install-files uninstall man

setup:
	@bash lab/setup.sh

test: setup
	$(PY) -m pytest -q tests

unit: setup
	$(PY) -m pytest -q tests -m "not integration"

integration: setup
	$(PY) -m pytest -q tests -m integration

demo: setup
	$(PY) -m lab.demo_resolver

lint: setup
	.venv/bin/ruff check resolver autosp lab tests bench
	.venv/bin/mypy resolver autosp

lab-up: setup
	$(PY) -m lab up

lab-down: setup
	$(PY) -m lab down

clean:
	-$(PY) -m lab down
	rm -rf .venv .lab

# --- installing the service (DESTDIR-aware; no root needed with DESTDIR) -----------------------
# `make install` puts the programs, their Python dependencies (beside them, not in the system's
# site-packages), the systemd unit, tmpfiles.d and sysusers.d entries, the manual pages and the
# default configuration in place; without DESTDIR it then creates the user and directories and
# reloads systemd. `make uninstall` removes all of it again, except a configuration file that
# was changed, the state in /var/lib/ipseckey-resolver and the user (as a Debian package would).
# The dependencies are installed by pip with INSTALL_PIP (PIP_INSTALL_OPTS, e.g.
# "--no-index --find-links DIR", for an offline install); they must be built for the Python
# that runs the programs (INSTALL_PYTHON), so both must be the same minor version.
DESTDIR ?=
prefix ?= /usr/local
sbindir ?= $(prefix)/sbin
pkglibdir ?= $(prefix)/lib/ipseckey-resolver
mandir ?= $(prefix)/share/man
unitdir ?= $(prefix)/lib/systemd/system
tmpfilesdir ?= $(prefix)/lib/tmpfiles.d
sysusersdir ?= $(prefix)/lib/sysusers.d
confdir ?= /etc/ipseckey-resolver
CONFIG := $(confdir)/ipseckey-resolver.toml
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL_PIP ?= $(shell test -x $(PY) && echo $(PY) || echo python3) -m pip
PIP_INSTALL_OPTS ?=
MANPAGES := ipseckey-resolver.8 autosp.8 ipseckey-resolver.toml.5

man:
	@mkdir -p build/man
	PYTHONPATH=. $(word 1,$(INSTALL_PIP)) -m resolver.manpage build/man

install: install-deps install-files
	@if [ -z "$(DESTDIR)" ]; then \
	    systemd-sysusers $(sysusersdir)/ipseckey-resolver.conf; \
	    systemd-tmpfiles --create $(tmpfilesdir)/ipseckey-resolver.conf; \
	    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	    echo "installed: systemctl enable --now ipseckey-resolver"; fi

install-deps:
	@want=$$($(INSTALL_PYTHON) -c 'import sys; print(*sys.version_info[:2])'); \
	 have=$$($(word 1,$(INSTALL_PIP)) -c 'import sys; print(*sys.version_info[:2])'); \
	 if [ "$$want" != "$$have" ]; then echo "install: $(INSTALL_PYTHON) is Python $$want but pip \
	runs on $$have: set INSTALL_PIP to a pip of the same version" >&2; exit 1; fi
	install -d $(DESTDIR)$(pkglibdir)
	$(INSTALL_PIP) install --quiet --disable-pip-version-check --no-compile --upgrade \
	    --target $(DESTDIR)$(pkglibdir) $(PIP_INSTALL_OPTS) \
	    $$($(word 1,$(INSTALL_PIP)) -c 'import tomllib; \
	       print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"])')

install-files: man
	install -d $(DESTDIR)$(pkglibdir) $(DESTDIR)$(sbindir) $(DESTDIR)$(unitdir) \
	    $(DESTDIR)$(tmpfilesdir) $(DESTDIR)$(sysusersdir) $(DESTDIR)$(mandir)/man8 \
	    $(DESTDIR)$(mandir)/man5 $(DESTDIR)$(confdir)
	for pkg in resolver autosp; do \
	    rm -rf $(DESTDIR)$(pkglibdir)/$$pkg; \
	    (cd $$pkg && find . -name __pycache__ -prune -o -type f \( -name '*.py' -o -name py.typed \) \
	        -print | while read -r f; do install -D -m 0644 "$$f" "$(DESTDIR)$(pkglibdir)/$$pkg/$$f"; done); \
	done
	for prog in ipseckey-resolver:resolver.__main__ autosp:autosp.cli; do \
	    name=$${prog%%:*}; mod=$${prog#*:}; \
	    printf '#!%s -I\nimport sys\nsys.path.insert(0, "%s")\nfrom %s import main\nsys.exit(main())\n' \
	        "$(INSTALL_PYTHON)" "$(pkglibdir)" "$$mod" > $(DESTDIR)$(sbindir)/$$name; \
	    chmod 0755 $(DESTDIR)$(sbindir)/$$name; \
	done
	sed -e 's|@SBINDIR@|$(sbindir)|g' -e 's|@CONFIG@|$(CONFIG)|g' \
	    contrib/systemd/ipseckey-resolver.service.in > $(DESTDIR)$(unitdir)/ipseckey-resolver.service
	chmod 0644 $(DESTDIR)$(unitdir)/ipseckey-resolver.service
	install -m 0644 contrib/tmpfiles.d/ipseckey-resolver.conf $(DESTDIR)$(tmpfilesdir)/
	install -m 0644 contrib/sysusers.d/ipseckey-resolver.conf $(DESTDIR)$(sysusersdir)/
	install -m 0644 build/man/ipseckey-resolver.8 build/man/autosp.8 $(DESTDIR)$(mandir)/man8/
	install -m 0644 build/man/ipseckey-resolver.toml.5 $(DESTDIR)$(mandir)/man5/
	@if [ -e $(DESTDIR)$(CONFIG) ]; then echo "install: keeping $(DESTDIR)$(CONFIG)"; \
	else install -m 0644 contrib/ipseckey-resolver.toml $(DESTDIR)$(CONFIG); fi

uninstall:
	-@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	    systemctl disable --now ipseckey-resolver.service 2>/dev/null; fi
	rm -rf $(DESTDIR)$(pkglibdir)
	rm -f $(DESTDIR)$(sbindir)/ipseckey-resolver $(DESTDIR)$(sbindir)/autosp \
	    $(DESTDIR)$(unitdir)/ipseckey-resolver.service \
	    $(DESTDIR)$(tmpfilesdir)/ipseckey-resolver.conf \
	    $(DESTDIR)$(sysusersdir)/ipseckey-resolver.conf \
	    $(DESTDIR)$(mandir)/man8/ipseckey-resolver.8 $(DESTDIR)$(mandir)/man8/autosp.8 \
	    $(DESTDIR)$(mandir)/man5/ipseckey-resolver.toml.5
	@if [ -f $(DESTDIR)$(CONFIG) ] && cmp -s contrib/ipseckey-resolver.toml $(DESTDIR)$(CONFIG); then \
	    rm -f $(DESTDIR)$(CONFIG); rmdir $(DESTDIR)$(confdir) 2>/dev/null || true; \
	elif [ -f $(DESTDIR)$(CONFIG) ]; then echo "uninstall: keeping the changed $(DESTDIR)$(CONFIG)"; fi
	-@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "uninstall: kept /var/lib/ipseckey-resolver (state) and the ipseckey-resolver user"
