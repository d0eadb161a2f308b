"""Netlink framing shared by the kernel edges (XFRM policies, routes and rules).

Each edge packs its own structures with `struct` (resolver/tunnels/xfrm.py says why: pyroute2's
synchronous API costs ~0.6 ms a message, and it has no XFRM classes); what they share is here:
the nlmsghdr, the walk over the messages of a datagram, route attributes, the errno of an ACK,
and the socket opened inside a network namespace (pyroute2 does only that).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Final

from pyroute2 import netns as pyroute2_netns

NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTATTR: Final = struct.Struct("=HH")  # len, type (struct rtattr / nlattr)
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_REPLACE: Final = 0x100
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400
NLM_F_DUMP: Final = 0x300
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10
NETLINK_GET_STRICT_CHK: Final = 12


def message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: nlmsghdr + body (the body padded to 4 bytes by the caller)."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, body) of each netlink message in a datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, mtype, _, seq, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size:
            return  # malformed: never loop on it
        yield mtype, seq, data[offset + NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3


def error_of(body: bytes) -> int:
    """The errno of an NLMSG_ERROR body (0: an ACK)."""
    (err,) = struct.unpack_from("=i", body)
    return int(-err)


def dump(sock: socket.socket, request: bytes, seq: int, what: str) -> list[tuple[int, bytes]]:
    """Send a dump `request` (sequence number `seq`) and collect its messages until DONE:
    (type, body) pairs; late replies to earlier requests are skipped.

    Raises:
        OSError: the kernel answered the dump with an error ("WHAT dump: ...").
    """
    sock.send(request)
    found: list[tuple[int, bytes]] = []
    while True:
        for mtype, mseq, body in messages(sock.recv(1 << 16)):
            if mseq != seq:
                continue  # a late reply to an earlier request
            if mtype == NLMSG_DONE:
                return found
            if mtype == NLMSG_ERROR:
                err = error_of(body)
                raise OSError(err, f"{what} dump: {os.strerror(err)}")
            found.append((mtype, body))


def attr(kind: int, payload: bytes) -> bytes:
    """One route attribute (struct rtattr), padded to 4 bytes."""
    raw = RTATTR.pack(RTATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Attribute type -> payload of a flat attribute list (the first of each type)."""
    found: dict[int, bytes] = {}
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size:
            break  # malformed
        found.setdefault(kind & NLA_TYPE_MASK, data[offset + RTATTR.size:offset + length])
        offset += (length + 3) & ~3
    return found


def open_socket(netns: str | None, proto: int) -> socket.socket:
    """A bound netlink socket of protocol `proto` in namespace `netns` (None: ours), with
    short ACKs (NETLINK_CAP_ACK) and a timeout that only bounds a bug."""
    # flags=0: never create the namespace (pyroute2's default would).
    sock: socket.socket = pyroute2_netns.create_socket(
        netns=netns, family=socket.AF_NETLINK, socket_type=socket.SOCK_DGRAM, proto=proto,
        flags=0)
    sock.bind((0, 0))
    # ACKs without a copy of the request (NETLINK_CAP_ACK): 36 bytes each, not ~200.
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    sock.settimeout(5.0)  # the kernel answers at once; this only bounds a bug
    return sock
