"""The platform shim's two calls to the invoke API, run inside the container: its network
is the container's (none but loopback), as the shim's is.

    python -c "$(cat scripts/invoke_client.py)" health|invoke [TIMEOUT_S]

Prints "STATUS SECONDS" (status 0: no answer: connection refused or timed out) and exits
0 on the status the shim counts as success (health 200, invoke 201), else 1. Like the
shim, it follows no redirect. Standard library only.
"""

import sys
import time
import urllib.error
import urllib.request

PORT = 4743


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None  # the shim fails on a redirect: report its status instead


call = sys.argv[1]
timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
request = urllib.request.Request(
    f"http://127.0.0.1:{PORT}/{call}",
    method="GET" if call == "health" else "POST",
    data=None if call == "health" else b"",
)
started = time.perf_counter()
try:
    with urllib.request.build_opener(NoRedirect).open(request, timeout=timeout) as response:
        status = response.status
except urllib.error.HTTPError as error:
    status = error.code
except OSError:
    status = 0
print(status, f"{time.perf_counter() - started:.3f}")
sys.exit(0 if status == {"health": 200, "invoke": 201}.get(call) else 1)
