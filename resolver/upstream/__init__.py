"""Where answers come from: forwarders (UDP, TCP, TLS), the DNSSEC probe, the choice between
forwarding and iterating, and following resolv.conf.
"""
