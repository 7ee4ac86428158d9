"""`python tests/service/fake_server.py PORT`: the service around a slow fake, for the SIGTERM test."""

import sys

from routehead.service import ServiceSettings, serve
from tests.service.conftest import BatchFake

if __name__ == "__main__":
    serve(BatchFake(delay=0.4), port=int(sys.argv[1]), log_level="warning",
          settings=ServiceSettings(graceful_shutdown_s=5, max_batch_requests=2))
