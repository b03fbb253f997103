"""The library names the tasks use beyond ``layers.__all__``, in one place, so that a rename in
``layers`` is followed here alone: the thread limit, the LP-sort default and problem layer, and
how a call picks the library's settings or the solver's own."""

from __future__ import annotations

from typing import Any

from layers import Backend
from layers.qp import one_thread
from layers.sort import DEFAULT_LP_BACKEND, sort_qp_layer

__all__ = ["DEFAULT_LP_BACKEND", "one_thread", "settings", "settings_differ", "sort_qp_layer"]


def settings(library: bool) -> dict[str, Any]:
    """Keyword arguments of a layer call: the library's tuned settings (``True``) or the
    solver's defaults (``False``)."""
    return {"tuned": library}


def settings_differ(backend: Backend) -> bool:
    """Whether a backend's library settings differ from its solver's defaults."""
    return backend.tuned != backend.defaults
