"""Verifies a Sluice callback delivery, as a receiver would.

    verify.py SECRET SIGNATURE_HEADER < RAW_BODY     exit 0: genuine, 1: not

SECRET is the tenant's `whsec_...` (GET /v1/callbacks/secret), the header is
`Sluice-Signature: t=<unix seconds>,v1=<hex>`, and the body is the request's
raw bytes (before any JSON parsing). The tests run this file against real
deliveries, so it stays true.
"""

import hashlib
import hmac
import sys
import time


def verify(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    t, v1 = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or abs(time.time() - int(t)) > tolerance:
        return False  # malformed, or an old delivery replayed
    expected = hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1)


if __name__ == "__main__":
    sys.exit(0 if verify(sys.argv[1], sys.argv[2], sys.stdin.buffer.read()) else 1)
