"""`python tests/service/fake_server.py PORT [DELAY_S GRACE_S BATCH]`: the service around a slow fake (each model
call takes DELAY_S, default 0.4), for the SIGTERM tests; GRACE_S is graceful_shutdown_s (default 5), BATCH
max_batch_requests (default 2)."""

import sys

from routehead.service import ServiceSettings, serve
from tests.service.conftest import BatchFake

if __name__ == "__main__":
    args = sys.argv[1:]
    delay = float(args[1]) if len(args) > 1 else 0.4
    grace = float(args[2]) if len(args) > 2 else 5.0
    batch = int(args[3]) if len(args) > 3 else 2
    serve(BatchFake(delay=delay), port=int(args[0]), log_level="warning",
          settings=ServiceSettings(graceful_shutdown_s=grace, max_batch_requests=batch))
