"""Names and JSON input schemas of every tool an agent can call, as MATPO defines them.

One source of truth for: the system prompts (the generated tool list), the tool-call validator and
format reward, the MCP servers that implement the tools, and the planner's agent tool.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolSpec:
    server: str
    name: str
    description: str
    input_schema: dict[str, Any] = field(hash=False, compare=False)

    @property
    def required(self) -> list[str]:
        return list(self.input_schema.get("required", []))


SEARCH_SERVER = "search_and_scrape_webpage"
AGENT_SERVER = "browsing_agent"

GOOGLE_SEARCH = ToolSpec(
    server=SEARCH_SERVER, name="google_search",
    description="Search the web. Returns organic results (title, link, snippet) for the query.",
    input_schema={
        "type": "object",
        "properties": {
            "q": {"type": "string", "description": "search query"},
            "gl": {"type": "string", "description": "region code, e.g. 'us'"},
            "hl": {"type": "string", "description": "language code, e.g. 'en'"},
            "location": {"type": "string", "description": "location the search originates from"},
            "num": {"type": "integer", "description": "number of results (default 10)"},
            "tbs": {"type": "string", "description": "time filter, e.g. 'qdr:y' for the past year"},
            "page": {"type": "integer", "description": "result page, 1-based"},
        },
        "required": ["q"],
        "additionalProperties": False,
    },
)

SCRAPE = ToolSpec(
    server=SEARCH_SERVER, name="scrape",
    description="Fetch a web page and return its text content.",
    input_schema={
        "type": "object",
        "properties": {"url": {"type": "string", "description": "absolute http(s) URL"}},
        "required": ["url"],
        "additionalProperties": False,
    },
)

SEARCH_AND_BROWSE = ToolSpec(
    server=AGENT_SERVER, name="search_and_browse",
    description=("Delegate a subtask to a browsing agent that searches the web and reads pages, then "
                 "returns a summary of what it found, with sources. Give one focused subtask per call."),
    input_schema={
        "type": "object",
        "properties": {"subtask": {"type": "string", "description": "the subtask, self-contained"}},
        "required": ["subtask"],
        "additionalProperties": False,
    },
)

WORKER_TOOLS: tuple[ToolSpec, ...] = (GOOGLE_SEARCH, SCRAPE)
PLANNER_TOOLS: tuple[ToolSpec, ...] = (SEARCH_AND_BROWSE,)
SINGLE_AGENT_TOOLS: tuple[ToolSpec, ...] = (GOOGLE_SEARCH, SCRAPE)


def find_tool(tools: tuple[ToolSpec, ...] | list[ToolSpec], server: str, name: str) -> ToolSpec | None:
    for t in tools:
        if t.server == server and t.name == name:
            return t
    return None
