"""autosp: manage IPsec endpoints known by name, and publish this host's key and address in DNS.

The command line lives in `autosp.cli`; each subcommand's work is in a module of its own
(`keygen`, `tsig`, `plan`, `publish`, `nsupdate`, `addresses`, `control`). Pure parts (plans,
parsers, record text) do no I/O, so they are tested without a network; the edges (DNS UPDATE,
validating lookup, nsupdate, the control socket) are thin.
"""
