"""Tools for the agents: specs (names/schemas), the MCP search/scrape server and the rollout client.

Exports are lazy so that importing `megatron_matpo.toolbox.specs` (prompts, validators) does not
pull in the MCP SDK and HTTP stacks.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ToolClient": "client", "ToolResult": "client", "ToolCallStats": "client",
    "LocalSearchIndex": "local_search", "Page": "local_search", "PageNotFound": "local_search",
    "NoiseConfig": "noise", "NoiseInjector": "noise",
    "ToolboxConfig": "server", "Toolbox": "server", "RunningServer": "server", "ToolError": "server",
    "build_mcp_server": "server",
    "SerperClient": "web", "WebScraper": "web", "WebConfig": "web", "WebError": "web",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
