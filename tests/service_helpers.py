"""Moved to ``tests/service/conftest.py``; this re-export keeps ``tests/api/test_aio.py`` importing until it
imports from there (then delete this file)."""

from tests.service.conftest import BOOM, FAKE_MODEL, SLOW, BatchFake, FakeRanking, fake_rank, live_server

__all__ = ["BOOM", "FAKE_MODEL", "SLOW", "BatchFake", "FakeRanking", "fake_rank", "live_server"]
