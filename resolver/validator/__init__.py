"""DNSSEC validation: one upstream response in, a verdict out.

A pure core apart from the ``fetch`` callback it is handed for the chain of trust. Modules:
``response`` (the entry point, ``Validator``), ``chain`` (DS -> DNSKEY from a trust anchor),
``sig`` (budgeted signature checks), ``nsec``/``nsec3``/``denial`` (proofs of absence),
``anchors`` (trust anchor files and NTAs), ``types`` (verdicts, limits, budgets).
"""
