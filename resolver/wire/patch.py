"""One output-identical speed patch to dnspython: `Name.to_wire` into a file, uncompressed.

Theory of operation: this module does no I/O and reads no clock; importing it changes one
method of `dns.name.Name` for the whole process, once.

Why: dnspython hashes an rdata by rendering it (`Rdata.__hash__` is the hash of
`to_digestable()`), and every RRset it builds puts its rdatas in a dict, so parsing a
response hashes each record once; signature checks render each rdata again
(`to_digestable`), and so does rendering a reply. Inside those, `Name.to_wire(file, None)`
builds a new, validated `Name` object for every suffix of the name, only to look it up in a
compression table that is not there (compress=None). Measured on the lab zones' real NODATA
response (SOA, NSEC and their RRSIGs): two thirds of a parse was this; on a cold positive
lookup, 5 % of the CPU.

What: for an absolute name written to a file without a compression table (the only case it
takes; everything else goes to the original method), write the same bytes, the same way
(lowercased labels when canonicalize is set), without the Name objects.
tests/test_dnspatch.py checks the bytes against the original method on random names.

dnspython is pinned to 2.9.x (pyproject.toml); a version that changes `Name.to_wire` must
pass that test before this patch can stay.
"""

from __future__ import annotations

from typing import Any

import dns.name

original_to_wire = dns.name.Name.to_wire


def _to_wire(self: dns.name.Name, file: Any | None = None,
             compress: dns.name.CompressType | None = None,
             origin: dns.name.Name | None = None, canonicalize: bool = False) -> bytes | None:
    labels = self.labels
    if file is None or compress is not None or not labels or labels[-1] != b"":
        return original_to_wire(self, file, compress, origin, canonicalize)
    if canonicalize:
        file.write(b"".join(bytes((len(label),)) + label.lower() for label in labels))
    else:
        file.write(b"".join(bytes((len(label),)) + label for label in labels))
    return None


_to_wire.__doc__ = original_to_wire.__doc__
if getattr(dns.name.Name.to_wire, "__name__", "") != "_to_wire":
    dns.name.Name.to_wire = _to_wire  # type: ignore[method-assign]
