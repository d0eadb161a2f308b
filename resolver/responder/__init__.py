"""The responder: hosts that run only ipseckey-resolver accept tunnels from initiators they were
never told about, authenticated by the initiator's DNSSEC-secure IPSECKEY.

  core.py      pure: [responder] config, the admission rules and bounds, the conn payloads
  charonlog.py pure: what charon's VICI log and updown events say (unknown initiators, why an
               initiate failed)
  events.py    what the VICI log listener hands over, filtered on its thread
  manager.py   asyncio: learns unknown initiators, looks them up, loads and leases their conns
  charon.py    the responder's VICI commands (run in the ViciBackend's workers)
"""
