"""DNS over TLS (RFC 7858) to a forwarder: `tls://ADDR[:PORT]#NAME` in `[upstream] servers`.

Theory of operation: the forwarder (upstream/forward.py) hands a query meant for a `tls://` server
to `exchange`, which sends it with dnspython's own DoT client (`dns.asyncquery.tls`) on a fresh TLS
connection and returns the reply, or raises `UpstreamError` saying why (certificate not accepted,
refused, timeout, not DNS). The TLS context (`client_context`) is strict: TLS 1.2 or later, a
certificate chain to the system's CAs (or `[upstream] tls_ca_file`), and the name after `#` checked
against the certificate (`check_hostname`), so an on-path attacker with some other valid certificate
is refused; a plain-DNS fallback is never tried. TLS makes the questions private on the path; it
does not replace validation: every answer is still validated from our own trust anchors, exactly as
a plain forwarded one.

One connection per exchange is the simple, honest first step (a handshake per question costs
one or two round trips more than UDP); keeping connections open and pipelining (RFC 7766) is
the obvious next one.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

import dns.asyncquery
import dns.exception
import dns.message

from resolver.config import HostPort
from resolver.errors import UpstreamError

ALPN: Final = ["dot"]  # RFC 7858 section 3.2's ALPN token


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """The TLS client context for forwarders: verify the chain and the name, TLS 1.2 or later.

    Args:
        ca_file: PEM bundle of the CAs to trust; None: the system's default store.

    Raises:
        OSError, ssl.SSLError: the CA file cannot be read or holds no certificate.
    """
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True  # create_default_context's default; stated, it is the point
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(ALPN)
    return context


async def exchange(server: HostPort, query: dns.message.Message, context: ssl.SSLContext,
                   timeout: float) -> dns.message.Message:
    """One query to a DoT server on a fresh connection; the reply must answer our question.

    Raises:
        UpstreamError: connection refused, certificate not accepted (name or chain), timeout,
            or a reply that is not DNS or not an answer to `query`.
    """
    try:
        return await dns.asyncquery.tls(query, server.host, timeout=timeout, port=server.port,
                                        ssl_context=context, server_hostname=server.tls_name)
    except ssl.SSLCertVerificationError as e:
        raise UpstreamError(f"{server}: TLS certificate not accepted: "
                            f"{e.verify_message or e.reason}") from None
    except dns.exception.Timeout:
        raise UpstreamError(f"{server}: TLS timeout after {timeout:g} s") from None
    except ssl.SSLError as e:
        raise UpstreamError(f"{server}: TLS: {e.reason or e}") from None
    except OSError as e:
        raise UpstreamError(f"{server}: TLS: {e.strerror or e}") from None
    except (dns.exception.DNSException, EOFError, ValueError) as e:
        # BadResponse (not an answer to our question), a truncated or garbled message.
        raise UpstreamError(f"{server}: TLS reply not usable: {e or type(e).__name__}") from None
