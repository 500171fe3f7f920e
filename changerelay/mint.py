"""``changerelay token``: mint a JWT the relay accepts, for trying auth out and for tests.

In production the application that signs users in issues tokens; this is the quickest way to get
one that exercises the same claims (``ns``, ``filter``) without writing that code first. The
claims are checked the way the relay checks them at the handshake, so a token that this prints
is one the relay admits (or refuses with a clear 403 for the namespaces it names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jwt

from . import filters


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Print a signed JWT for the relay (HS256 with --secret, or "
        "RS256/ES256 with --private-key).",
        epilog="Example: changerelay token --secret s3cret --sub alice --ns shop.orders "
        "--filter '{\"fullDocument.owner\": \"alice\"}' --ttl 3600")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--secret", help="HS256 secret; default: AUTH_JWT_SECRET from the "
                     "environment")
    key.add_argument("--private-key", type=Path, help="PEM private key for RS256/ES256")
    parser.add_argument("--algorithm", choices=("HS256", "RS256", "ES256"),
                        help="default: HS256 with --secret, RS256 with --private-key")
    parser.add_argument("--sub", help="the subject (who the token is for)")
    parser.add_argument("--ns", action="append", default=None, metavar="NS",
                        help="a db or db.collection the bearer may subscribe to; repeat or "
                        "comma-separate for several (default: no ns claim, i.e. everything)")
    parser.add_argument("--filter", metavar="JSON",
                        help="a row rule in the filter language, ANDed with every "
                        "subscription, e.g. '{\"fullDocument.owner\": \"alice\"}'")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires "
                        "(default 3600; the relay requires exp)")
    return parser


def claims_from(args: argparse.Namespace, now: float) -> dict[str, Any]:
    """The claims for ``args``; ValueError with a message for the command line."""
    if args.ttl <= 0:
        raise ValueError("--ttl must be a positive number of seconds")
    claims: dict[str, Any] = {"iat": int(now), "exp": int(now) + args.ttl}
    if args.sub:
        claims["sub"] = args.sub
    if args.ns is not None:
        names = [item.strip() for value in args.ns for item in value.split(",") if item.strip()]
        if not names:
            raise ValueError("--ns is empty; give db or db.collection names")
        claims["ns"] = names
    if args.filter is not None:
        try:
            filters.parse_filter(args.filter)
        except filters.FilterError as exc:
            raise ValueError(f"--filter: {exc.message}") from None
        claims["filter"] = json.loads(args.filter)
    return claims


def main(argv: list[str], prog: str = "changerelay token") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.private_key is not None:
        key, algorithm = args.private_key.read_text(), args.algorithm or "RS256"
        if algorithm == "HS256":
            parser.error("HS256 signs with --secret; a private key signs RS256 or ES256")
    else:
        key, algorithm = args.secret or os.environ.get("AUTH_JWT_SECRET"), "HS256"
        if not key:
            parser.error("give --secret (or set AUTH_JWT_SECRET) or --private-key")
        if args.algorithm not in (None, "HS256"):
            parser.error(f"{args.algorithm} signs with --private-key; --secret signs HS256")
    try:
        claims = claims_from(args, time.time())
    except ValueError as exc:
        parser.error(str(exc))
    print(jwt.encode(claims, key, algorithm=algorithm))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
