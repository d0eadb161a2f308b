"""ipseckey-resolver: a DNSSEC-validating local resolver that brings IPsec up before it answers."""

__version__ = "0.1.0"
