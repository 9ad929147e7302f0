"""Container health check for the engine-service images and compose.yaml.

Contract: exits 0 when ``GET /healthz`` on the local server answers 200 within the timeout, 1 otherwise,
with one line on stderr saying what failed. It reads the address the server binds from the same settings
the server reads (``ENGINE_SERVICE_HOST``, ``ENGINE_SERVICE_PORT``, defaults 0.0.0.0 and 8000 in the
images), so changing the port in the environment moves both together. Only the standard library is used:
the script runs in any image the service runs in, with neither curl nor the service's packages.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

DEFAULT_PORT = "8000"
TIMEOUT_SECONDS = 4.0  # below the images' HEALTHCHECK --timeout=5s, so the script reports its own failure
# A server bound to every interface is reached over loopback; these spellings all mean "every interface".
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def health_url(environ: Mapping[str, str]) -> str:
    """The liveness URL of the server configured by ``environ``."""
    host = environ.get("ENGINE_SERVICE_HOST", "").strip()
    port = environ.get("ENGINE_SERVICE_PORT", DEFAULT_PORT).strip() or DEFAULT_PORT
    if host in WILDCARD_HOSTS:
        host = "[::1]" if host in {"::", "[::]"} else "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a literal IPv6 address needs brackets in a URL
    return f"http://{host}:{port}/healthz"


def check(url: str, timeout: float = TIMEOUT_SECONDS) -> str | None:
    """None when ``url`` answers 200; otherwise a sentence saying what went wrong."""
    # An empty ProxyHandler: HTTP(S)_PROXY set for the service's own downloads must not route the
    # health check to a proxy that cannot reach the container's loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} is not reachable: {reason}"
    if status != 200:
        return f"{url} answered HTTP {status}"
    return None


def main() -> int:
    """Run the check against the configured server; the process exit status is the result."""
    problem = check(health_url(os.environ))
    if problem is not None:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
