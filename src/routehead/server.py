"""Compatibility: the re-rank service moved to :mod:`routehead.service`; these names keep working."""

from routehead.service import Limits, ServiceSettings, create_app, serve
from routehead.service.errors import GENERIC_500 as _GENERIC_500

__all__ = ["Limits", "ServiceSettings", "create_app", "serve", "_GENERIC_500"]
