"""A key-value store as an MCP server over stdio (``python kv_server.py``), for tests and docs/environments.md.

Run with ``--http PORT`` it serves streamable HTTP at ``http://127.0.0.1:PORT/mcp`` instead.
"""

import os
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

# Quiet: at ERROR, the server renders crash's traceback with rich, which takes about 1 s.
server = MCPServer("kv", log_level="CRITICAL")
store: dict[str, str] = {}


@server.tool()
def put(key: str, value: str) -> str:
    """Store a value under a key."""
    store[key] = value
    return "stored"


@server.tool()
def get(key: str) -> str:
    """Read the value stored under a key."""
    if key not in store:
        raise ToolError(f"no key {key!r}")  # the client gets the message, marked isError
    return store[key]


@server.tool()
def crash() -> str:
    """Fail unexpectedly (for tests)."""
    raise RuntimeError("the store is on fire")  # the client gets "Error executing tool crash", marked isError


@server.tool()
def nap(seconds: float) -> str:
    """Sleep (for tests)."""
    time.sleep(seconds)
    return "rested"


@server.tool()
def pid() -> int:
    """This server's process id (for tests)."""
    return os.getpid()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
