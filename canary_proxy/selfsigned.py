"""The placeholder certificate of Ingress mode's HTTPS port without ``--default-tls-secret``.

ingress-nginx generates a self-signed "Kubernetes Ingress Controller Fake Certificate" at
start and serves it to clients that send no SNI or name a host it has no certificate for;
canary-proxy does the same, with the same subject, so a probe that checks for it still
works. No client trusts it: it only lets such a client finish the handshake and get the
default backend's answer (or the 404) instead of a TLS alert.

The standard library cannot make keys, and the proxy does not depend on ``cryptography``,
so this module signs the one certificate itself: ECDSA on P-256 (FIPS 186-4), the key and
certificate DER-encoded by hand. Made once per process at start and never used to sign
anything else; the handshakes themselves are OpenSSL's. The arithmetic is not constant
time, which is harmless here: the signature is made once, before the port opens.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import secrets
from typing import Final

SUBJECT_ORGANIZATION: Final = "Acme Co"  # ingress-nginx's fake certificate says the same
SUBJECT_COMMON_NAME: Final = "Kubernetes Ingress Controller Fake Certificate"
SUBJECT_ALT_NAME: Final = "ingress.local"

# P-256 (secp256r1): y^2 = x^3 - 3x + b over GF(p), base point G of prime order n.
_P: Final = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_B: Final = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_G: Final = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)

Point = tuple[int, int] | None  # None: the point at infinity


def _add(a: Point, b: Point) -> Point:
    if a is None:
        return b
    if b is None:
        return a
    (x1, y1), (x2, y2) = a, b
    if x1 == x2:
        if (y1 + y2) % _P == 0:
            return None
        slope = (3 * x1 * x1 - 3) * pow(2 * y1, -1, _P) % _P
    else:
        slope = (y2 - y1) * pow(x2 - x1, -1, _P) % _P
    x3 = (slope * slope - x1 - x2) % _P
    return x3, (slope * (x1 - x3) - y1) % _P


def _multiply(k: int, point: Point) -> Point:
    result: Point = None
    while k:
        if k & 1:
            result = _add(result, point)
        point = _add(point, point)
        k >>= 1
    return result


def _sign(d: int, message: bytes) -> tuple[int, int]:
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")
    while True:
        k = 1 + secrets.randbelow(_N - 1)
        point = _multiply(k, _G)
        assert point is not None
        r = point[0] % _N
        s = pow(k, -1, _N) * (e + r * d) % _N
        if r and s:
            return r, s


# -- DER ------------------------------------------------------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))  # a leading 0: positive


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    out = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _time(moment: datetime.datetime) -> bytes:
    if moment.year < 2050:  # RFC 5280 4.1.2.5: UTCTime through 2049
        return _tlv(0x17, moment.strftime("%y%m%d%H%M%SZ").encode())
    return _tlv(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode())


def _name() -> bytes:
    def attribute(oid: str, value: str) -> bytes:
        return _tlv(0x31, _seq(_oid(oid), _tlv(0x0C, value.encode())))  # a SET of one UTF8String

    return _seq(attribute("2.5.4.10", SUBJECT_ORGANIZATION), attribute("2.5.4.3", SUBJECT_COMMON_NAME))


_EC_PUBLIC_KEY: Final = "1.2.840.10045.2.1"
_PRIME256V1: Final = "1.2.840.10045.3.1.7"
_ECDSA_SHA256: Final = "1.2.840.10045.4.3.2"


def _pem(label: str, der: bytes) -> str:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def fake_certificate(*, days: int = 365) -> tuple[bytes, bytes]:
    """A new key and a self-signed certificate for it, as PEM: (certificate, key)."""
    d = 1 + secrets.randbelow(_N - 1)
    public = _multiply(d, _G)
    assert public is not None
    point = b"\x04" + public[0].to_bytes(32, "big") + public[1].to_bytes(32, "big")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    algorithm = _seq(_oid(_ECDSA_SHA256))
    san = _seq(_oid("2.5.29.17"), _tlv(0x04, _seq(_tlv(0x82, SUBJECT_ALT_NAME.encode()))))
    tbs = _seq(
        _tlv(0xA0, _int(2)),  # v3
        _int(secrets.randbits(63) | 1 << 62),
        algorithm,
        _name(),
        _seq(_time(now - datetime.timedelta(hours=1)), _time(now + datetime.timedelta(days=days))),
        _name(),
        _seq(_seq(_oid(_EC_PUBLIC_KEY), _oid(_PRIME256V1)), _tlv(0x03, b"\x00" + point)),
        _tlv(0xA3, _seq(san)),
    )
    r, s = _sign(d, tbs)
    certificate = _seq(tbs, algorithm, _tlv(0x03, b"\x00" + _seq(_int(r), _int(s))))
    key = _seq(
        _int(1),
        _tlv(0x04, d.to_bytes(32, "big")),
        _tlv(0xA0, _oid(_PRIME256V1)),
        _tlv(0xA1, _tlv(0x03, b"\x00" + point)),
    )
    return _pem("CERTIFICATE", certificate).encode(), _pem("EC PRIVATE KEY", key).encode()
