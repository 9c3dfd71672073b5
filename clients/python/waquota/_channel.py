"""Channel credentials and call metadata, shared by both clients."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import grpc

PemSource = Union[bytes, str, Path]


def read_pem(value: Optional[PemSource]) -> Optional[bytes]:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def credentials(
    tls: bool,
    ca: Optional[PemSource],
    cert: Optional[PemSource],
    key: Optional[PemSource],
) -> Optional[grpc.ChannelCredentials]:
    """TLS credentials when any TLS option is given, else None (plain text)."""
    if not (tls or ca is not None or cert is not None or key is not None):
        return None
    if (cert is None) != (key is None):
        raise ValueError("cert and key: give both for mutual TLS, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca),
        private_key=read_pem(key),
        certificate_chain=read_pem(cert),
    )


def metadata(token: Optional[str]) -> tuple[tuple[str, str], ...]:
    # docs/operations.md, "Authentication and roles": every QuotaService call carries the bearer token.
    return (("authorization", f"Bearer {token}"),) if token else ()
