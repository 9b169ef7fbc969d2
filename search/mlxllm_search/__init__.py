"""mlxllm-search: architecture search for mlxllm models with Optuna. `mlxllm search` on the command line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlxllm_search.run import SearchResult


def search(spec: Any, **kwargs: Any) -> SearchResult:
    """Run or resume a search (see `mlxllm_search.run.search`); Optuna is imported only when called."""
    from mlxllm_search.run import search as _search

    return _search(spec, **kwargs)


__all__ = ["search"]
