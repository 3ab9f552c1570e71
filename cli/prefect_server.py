"""``prefect server start``, with the Host header checked: what ``dispatch up`` runs as its Prefect server.

Prefect's server has authentication (``PREFECT_SERVER_API_AUTH_STRING``) and
CORS settings, but answers any Host: a web page on another site could reach
it by rebinding its DNS name to 127.0.0.1. This runs the same application
that ``prefect server start`` runs in the foreground (``create_app(final=True)``,
services included) behind Starlette's ``TrustedHostMiddleware``, so a request
that does not name this machine is refused before Prefect sees it.

    python -m cli.prefect_server --host 127.0.0.1 --port 4200 [--allow-host NAME ...]
"""

from __future__ import annotations

import argparse

from aip.access import LOOPBACK_NAMES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--allow-host", action="append", default=[], help="another Host name to answer to")
    options = parser.parse_args(argv)

    import uvicorn
    from prefect.server.api.server import create_app
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    allowed = [*LOOPBACK_NAMES, "[::1]", *options.allow_host]  # the hub's names; Starlette may keep the brackets
    if options.host not in ("0.0.0.0", "::"):
        allowed.append(options.host)
    app = TrustedHostMiddleware(create_app(final=True), allowed_hosts=allowed, www_redirect=False)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")


if __name__ == "__main__":
    main()
