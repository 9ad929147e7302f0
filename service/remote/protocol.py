"""The worker protocol's fixed names, shared by its two ends: the API server's worker routes
(:mod:`service.api.workers`, guarded in :mod:`service.api.auth`) and the remote worker's client
(:mod:`service.remote.client`). Changing one here changes both, so they cannot drift apart.
"""

from __future__ import annotations

# Every worker route lives under this prefix; the auth layer lets only the worker token in there.
WORKER_ROUTE_PREFIX = "/v1/worker"
WORKER_PATH_PREFIX = WORKER_ROUTE_PREFIX + "/"
# The header a remote worker presents the server's worker token in.
WORKER_TOKEN_HEADER = "X-Worker-Token"
