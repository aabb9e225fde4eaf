#!/usr/bin/env python3
"""Render deploy/nginx-tandem.conf.template into an nginx conf.d file (standard library
only: run it with the system's python3). Example in the template's header and in
docs/DEPLOY.md."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx-tandem.conf.template"
_RATE = re.compile(r"[1-9][0-9]*r/[sm]")
_UPSTREAM = re.compile(r"(unix:/\S+|[A-Za-z0-9.\-]+:[0-9]{1,5}|\[[0-9A-Fa-f:]+\]:[0-9]{1,5})")


def render(
    *,
    server_name: str,
    upstreams: list[str],
    certificate: str,
    certificate_key: str,
    http_listen: str = "80",
    https_listen: str = "443",
    auth_rate: str = "30r/m",
    auth_burst: int = 20,
) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", server_name):
        raise ValueError(f"--server-name {server_name!r}: one host name, no scheme or port")
    if not upstreams:
        raise ValueError("give at least one --upstream (host:port of a server process)")
    for upstream in upstreams:
        if not _UPSTREAM.fullmatch(upstream):
            raise ValueError(f"--upstream {upstream!r}: host:port or unix:/path")
    if not _RATE.fullmatch(auth_rate):
        raise ValueError(f"--auth-rate {auth_rate!r}: like 30r/m or 5r/s")
    https_port = https_listen.rsplit(":", 1)[-1]
    values = {
        "SERVER_NAME": server_name,
        # One failed attempt takes a process out of rotation for 2 s; the request goes to
        # another. Short, because while every process is out nginx answers 502 (a rolling
        # restart waits this long after each process is back: docs/DEPLOY.md).
        "UPSTREAMS": "\n".join(f"    server {u} max_fails=1 fail_timeout=2s;" for u in upstreams),
        "CERTIFICATE": certificate,
        "CERTIFICATE_KEY": certificate_key,
        "HTTP_LISTEN": http_listen,
        "HTTPS_LISTEN": https_listen,
        "HTTPS_PORT_SUFFIX": "" if https_port == "443" else f":{https_port}",
        "AUTH_RATE": auth_rate,
        "AUTH_BURST": str(auth_burst),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"the template has placeholders the renderer does not fill: {left}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server-name", required=True, help="the public host name, e.g. tandem.example.com")
    parser.add_argument("--upstream", action="append", required=True, help="host:port of a server process; repeat")
    parser.add_argument("--certificate", required=True, help="PEM certificate chain")
    parser.add_argument("--certificate-key", required=True, help="PEM private key")
    parser.add_argument("--http-listen", default="80", help="nginx listen for plain HTTP (default 80)")
    parser.add_argument("--https-listen", default="443", help="nginx listen for HTTPS (default 443)")
    parser.add_argument("--auth-rate", default="30r/m", help="requests to /api/auth/ per client address (default 30r/m)")
    parser.add_argument("--auth-burst", type=int, default=20, help="requests over the rate let through at once (default 20)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(
            render(
                server_name=args.server_name, upstreams=args.upstream, certificate=args.certificate,
                certificate_key=args.certificate_key, http_listen=args.http_listen,
                https_listen=args.https_listen, auth_rate=args.auth_rate, auth_burst=args.auth_burst,
            )
        )
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
