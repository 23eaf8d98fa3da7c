"""An MCP server's tools as an environment: MCPEnvironment, and MCPClient, the synchronous client under it.

The ``mcp`` client is async and the Environment protocol is synchronous, so each MCPClient runs its own event
loop on a private thread and waits for every call with a timeout. MCP servers have tools but no tasks and no
reward: an MCPEnvironment subclass brings those, as any ToolEnvironment does (docs/environments.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import logging
import sys
import threading
import weakref
from typing import IO, Any, Callable, ClassVar

try:
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from mcp.shared.exceptions import MCPError
    from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT, CallToolResult, TextResourceContents
    from mcp.types import Tool as MCPTool
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError(f"MCP environments need the mcp client ({exc}): pip install 'agentrl[mcp]'") from exc

from agentrl.envs.base import ToolEnvironment
from agentrl.envs.schema import checkable_spec
from agentrl.envs.tools import Tool, ToolError
from agentrl.types import Message, Task, ToolSpec

log = logging.getLogger(__name__)

__all__ = ["MCPEnvironment", "MCPClient", "StdioServerParameters", "openai_spec", "result_text"]


class MCPClient:
    """A synchronous client of one MCP server, run on a private event-loop thread.

    Args:
        server: a command to start (``StdioServerParameters``: the server talks over its stdin and stdout; it
            is stopped on close) or the URL of a streamable-HTTP server (``http://host:port/mcp``).
        timeout: seconds to connect (starting the server included), to list tools, and to close.
        errlog: where a started server's stderr goes; this process's stderr by default.

    Example:
        >>> client = MCPClient(StdioServerParameters(command=sys.executable,
        ...                                          args=["tests/mcp_servers/kv_server.py"]))
        >>> client.open()
        >>> client.call_tool("put", {"key": "a", "value": "1"}, timeout=10).content[0].text
        'stored'
        >>> client.close()
    """

    def __init__(self, server: StdioServerParameters | str, timeout: float = 30.0,
                 errlog: IO[str] | None = None) -> None:
        self.server, self.timeout, self.errlog = server, timeout, errlog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._failure: BaseException | None = None

    def __repr__(self) -> str:
        where = self.server if isinstance(self.server, str) else " ".join([self.server.command, *self.server.args])
        return f"MCPClient({where})"

    def open(self) -> None:
        """Start the server (for a command) and connect; raises if that fails or takes over ``timeout``."""
        if self._loop is not None:
            raise RuntimeError(f"{self!r} is already open")
        self._loop = asyncio.new_event_loop()
        self._client, self._failure = None, None
        self._stop = asyncio.Event()
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._task = self._loop.create_task(self._hold())
        self._thread = threading.Thread(target=self._run, args=(self._loop,), name="agentrl-mcp", daemon=True)
        self._thread.start()
        try:
            self._opened.result(self.timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            raise TimeoutError(f"{self!r} did not connect within {self.timeout:g} s") from None
        except BaseException:
            self.close()
            raise

    def list_tools(self) -> list[MCPTool]:
        """Every tool the server offers (all pages)."""

        async def every_page() -> list[MCPTool]:
            page = await self._client.list_tools()
            tools = list(page.tools)
            while page.next_cursor is not None:
                page = await self._client.list_tools(cursor=page.next_cursor)
                tools += page.tools
            return tools

        return self._wait(every_page, self.timeout)

    def call_tool(self, name: str, arguments: dict[str, Any], timeout: float) -> CallToolResult:
        """Call a tool. A result with ``is_error`` is returned; an error reply raises ``MCPError`` (code
        ``REQUEST_TIMEOUT`` after ``timeout`` seconds, ``CONNECTION_CLOSED`` once the server is gone)."""
        return self._wait(lambda: self._client.call_tool(name, arguments, read_timeout_seconds=timeout), timeout)

    def close(self) -> None:
        """Disconnect and stop a started server (stdin closed, then SIGTERM, then SIGKILL); never raises."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.call_soon_threadsafe(self._shutdown)
        # The SDK bounds its own shutdown (about 2 s for a server to exit on its own, 2 more after SIGTERM).
        self._thread.join(self.timeout)
        if self._thread.is_alive():
            log.warning("%r did not shut down within %g s; leaving its thread behind", self, self.timeout)
            return
        loop.close()
        if self._failure is not None and self._opened.done() and self._opened.exception() is None:
            log.warning("%r ended with %s: %s", self, type(self._failure).__name__, self._failure)

    # --- on the event-loop thread ------------------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_until_complete(self._task)
        except BaseException as exc:  # the thread's boundary: close() reports it
            self._failure = exc

    async def _hold(self) -> None:
        """Connect, then hold the connection open until close(): the Client must be entered and left in the
        same task."""
        transport = self.server if isinstance(self.server, str) else \
            stdio_client(self.server, errlog=self.errlog or sys.stderr)
        try:
            async with Client(transport, read_timeout_seconds=self.timeout) as client:
                self._client = client
                self._opened.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if self._opened.done():
                raise
            self._opened.set_exception(exc)

    def _shutdown(self) -> None:
        if self._client is None:
            self._task.cancel()  # still connecting
        self._stop.set()

    def _wait(self, call: Callable[[], Any], timeout: float) -> Any:
        """Run ``call()``'s coroutine on the loop and wait for it, a little longer than its own timeout."""
        if self._loop is None or self._client is None:
            raise RuntimeError(f"{self!r} is not open")
        if self._task.done():
            raise ConnectionError(f"{self!r}: the connection ended ({self._failure!r})")
        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        try:
            return future.result(timeout + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self!r}: no answer within {timeout + 5.0:g} s") from None


def openai_spec(tool: MCPTool) -> ToolSpec:
    """An MCP tool's listing as an OpenAI function-tool schema; its input schema is passed on as it is.

    Example:
        >>> openai_spec(MCPTool(name="get", description="Read a key.", input_schema={"type": "object"}))["function"]
        {'name': 'get', 'description': 'Read a key.', 'parameters': {'type': 'object'}}
    """
    if tool.input_schema.get("type") != "object":
        raise ValueError(f"MCP tool {tool.name!r}: its input schema must have \"type\": \"object\" (a tool call's "
                         f"arguments are an object), got {tool.input_schema!r}")
    return {"type": "function", "function": {"name": tool.name, "description": tool.description or "",
                                             "parameters": copy.deepcopy(tool.input_schema)}}


def result_text(result: CallToolResult) -> str:
    """A tool result as the model reads it: its text parts, one per line, and a note for each other part.

    A result with no content but structured content is that content as JSON.
    """
    parts = []
    for block in result.content:
        if block.type == "text":
            parts.append(block.text)
        elif block.type == "resource" and isinstance(block.resource, TextResourceContents):
            parts.append(block.resource.text)
        elif block.type == "resource":
            parts.append(f"[resource {block.resource.uri} ({block.resource.mime_type}) not shown]")
        elif block.type == "resource_link":
            parts.append(f"[resource link {block.uri}]")
        elif block.type in ("image", "audio"):
            parts.append(f"[{block.type} ({block.mime_type}) not shown]")
        else:
            parts.append(f"[{block.type} content not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


class MCPEnvironment(ToolEnvironment):
    """An environment whose tools are an MCP server's, next to the subclass's own :func:`tool` methods.

    An MCP server has tools but no tasks and no reward, so a subclass brings those as for any
    ToolEnvironment: ``name``, ``version``, ``system_prompt``, ``make_task``, ``oracle``, and a local
    :func:`tool` method that ends the episode with :meth:`finish` (an ``answer`` or ``submit``). It may read
    the server's state to score, with :meth:`call_server`. ``server`` says which server to use.

    Each instance has its own connection, opened on first use (``tools()`` or ``reset()``) and closed by
    ``close()``. With a command that is its own server process, so episodes, each on a fresh environment in
    the rollout engine and the env service, never share server state. An instance that plays another episode
    without ``close()`` keeps its server, and the server keeps its state.

    Bad calls are error observations, as in any ToolEnvironment: an unknown tool, arguments that do not fit
    the tool's schema (as far as :func:`~agentrl.envs.schema.checkable_spec` can check it; the server checks
    the rest), a result marked ``isError``, an error reply, and a call that runs past ``call_timeout``. A
    server that is gone (its process died, the connection dropped) raises ``ConnectionError``, so the rollout
    engine records an ``env_error``.

    Example:
        >>> class KV(MCPEnvironment):
        ...     name, version, system_prompt = "kv", "kv-v1", "Use the store."
        ...     server = StdioServerParameters(command=sys.executable, args=["tests/mcp_servers/kv_server.py"])
        >>> env = KV()
        >>> sorted(t["function"]["name"] for t in env.tools())
        ['crash', 'get', 'nap', 'pid', 'put']
        >>> env.close()
    """

    server: StdioServerParameters | str
    connect_timeout: ClassVar[float] = 30.0  # starting the server, connecting, listing tools, closing
    call_timeout: ClassVar[float] = 30.0  # one tool call

    def __init__(self, tools: list[Tool] | tuple[Tool, ...] = ()) -> None:
        super().__init__(tools)
        self._client: MCPClient | None = None
        self._close: weakref.finalize | None = None
        self._server_specs: list[ToolSpec] | None = None

    def tools(self) -> list[ToolSpec]:
        self._open()
        return super().tools()

    def reset(self, task: Task) -> list[Message]:
        self._open()
        return super().reset(task)

    def close(self) -> None:
        """Disconnect, and stop the server if this environment started it."""
        if self._close is not None:
            self._close()  # runs client.close() once; also runs at exit or when the environment is collected
        self._client, self._close = None, None

    def call_server(self, name: str, arguments: dict[str, Any]) -> str:
        """Call one of the server's tools as the model's calls are, unchecked; for local tools that score.

        Returns:
            the result's text (:func:`result_text`).

        Raises:
            ToolError: the tool failed (``isError``), the server replied with an error, or the call ran past
                ``call_timeout``. Raised from a tool, it is the model's error observation.
            ConnectionError: the server is gone.
        """
        if self._client is None:
            raise RuntimeError(f"{self.name}: no MCP connection; reset() opens one")
        try:
            result = self._client.call_tool(name, arguments, self.call_timeout)
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                raise ConnectionError(f"{self.name}: {self._client!r} is gone ({exc.message})") from exc
            if exc.code == REQUEST_TIMEOUT:
                raise ToolError(f"tool {name!r} did not finish within {self.call_timeout:g} s") from exc
            raise ToolError(exc.message) from exc
        text = result_text(result)
        if result.is_error:
            raise ToolError(text or f"tool {name!r} failed")
        return text

    def _open(self) -> None:
        if self._client is not None:
            return
        client = MCPClient(self.server, timeout=self.connect_timeout)
        client.open()
        try:
            specs = [openai_spec(listed) for listed in client.list_tools()]
            checks = [checkable_spec(spec) for spec in specs]
        except BaseException:
            client.close()
            raise
        self._client, self._close = client, weakref.finalize(self, client.close)
        if self._server_specs is None:
            self.add_tools(Tool(spec, self._server_tool(spec["function"]["name"]), check)
                           for spec, check in zip(specs, checks))
            self._server_specs = specs
        elif specs != self._server_specs:
            raise RuntimeError(f"{self.name}: {client!r} now lists other tools than it did before")

    def _server_tool(self, name: str) -> Callable[..., str]:
        def run(**arguments: Any) -> str:
            return self.call_server(name, arguments)

        return run
