"""``agentrl eval --model vllm``: evaluation episodes sampled by a vLLM server, started here or already running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from agentrl.config import VLLM_LORA_RANKS
from agentrl.eval.runner import InFlightLimit
from agentrl.policy.vllm import (BASE_NAME, BASE_VERSION, PolicyServerError, VLLMPolicy, VLLMServer,
                                 adapter_name)
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.engine import check_versions
from agentrl.rollout.episode import run_episodes

# An adapter loaded into a server that someone else started gets a version number no training run reaches:
# adapters are loaded in place by name, so a run and the eval must never pick the same one.
FOREIGN_SERVER_VERSION = 1_000_000_000


def check_vllm_model_args(model_args: dict[str, str]) -> None:
    """What ``--model vllm`` needs on this machine: the model directory (its tokenizer and chat template render
    the prompts) and, with an adapter, the adapter's directory."""
    pretrained = Path(model_args["pretrained"])
    if not (pretrained / "config.json").is_file():
        raise SystemExit(f"agentrl eval: no model at pretrained={pretrained} (want a model directory with "
                         f"config.json and its tokenizer)")
    if "adapter" in model_args and not (Path(model_args["adapter"]) / "adapter_config.json").is_file():
        raise SystemExit(f"agentrl eval: no adapter at adapter={model_args['adapter']} (want a PEFT adapter "
                         f"directory with adapter_config.json)")
    url = model_args.get("url", "")
    if "url" in model_args and not url.startswith(("http://", "https://")):
        raise SystemExit(f"agentrl eval: url={url!r} is not a server URL (want http://HOST:PORT)")


def adapter_rank(adapter: str | os.PathLike) -> int:
    """The largest LoRA rank in a PEFT adapter (``r``, and any per-module ``rank_pattern``), as vLLM checks it."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def server_lora_rank(rank: int) -> int:
    """The ``--max-lora-rank`` a started server needs for an adapter of ``rank``: the smallest value vLLM
    accepts that holds it (vLLM serves any adapter up to its max rank)."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise SystemExit(f"agentrl eval: the adapter has LoRA rank {rank}; vLLM serves adapters up to rank "
                         f"{max(VLLM_LORA_RANKS)} (--max-lora-rank is one of {VLLM_LORA_RANKS})")
    return fits[0]


def vllm_python(flag: str | None) -> str:
    """``--vllm_python``, else ``$AGENTRL_VLLM_PYTHON`` (launch/setup_vllm.sh exports it), else the default venv."""
    return flag or os.environ.get("AGENTRL_VLLM_PYTHON") or ".venv-vllm/bin/python"


def served_models(url: str) -> dict[str, dict]:
    """``{model id: entry}`` from a server's ``/v1/models``; a clear exit when nothing answers there."""
    try:
        response = httpx.get(url.rstrip("/") + "/v1/models", timeout=30.0)
    except httpx.HTTPError as exc:
        raise SystemExit(f"agentrl eval: no vLLM server answers at {url} ({type(exc).__name__}: {exc}); start one "
                         f"with `agentrl serve-vllm --model DIR --port PORT`, or leave url= out of --model_args to "
                         f"let the eval start one") from None
    if response.status_code != 200:
        raise SystemExit(f"agentrl eval: {url}/v1/models answered HTTP {response.status_code}: "
                         f"{response.text[:300]} (is it a vLLM OpenAI-compatible server?)")
    return {entry["id"]: entry for entry in response.json().get("data", [])}


@contextlib.contextmanager
def sigterm_as_exit():
    """SIGTERM unwinds like Ctrl-C does, so a started server is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def eval_with_vllm(args, model_args: dict[str, str], make_env, tasks: list, sampling, limits):
    """Run the eval episodes with a vLLM server: the one at ``url``, or one started here and always stopped.

    With an adapter, the server loads it under a version name and every sample must attest that version; without
    one, every sample must come from the model served as ``base``. Returns the trajectories and what to record
    about the server in results.json.
    """

    pretrained, adapter, url = model_args["pretrained"], model_args.get("adapter"), model_args.get("url", "")
    chat = ChatFormat(AutoTokenizer.from_pretrained(pretrained))
    server, log_path, loaded = None, None, None

    async def episodes(policy: VLLMPolicy) -> list:
        nonlocal loaded
        try:
            if adapter:
                loaded = adapter_name(version)
                await policy.load_adapter(adapter, version)
            return await run_episodes(InFlightLimit(policy, args.batch_size), make_env, tasks,
                                      list(range(len(tasks))), chat, sampling, limits)
        finally:
            await policy.aclose()

    with sigterm_as_exit():
        try:
            if url:
                models = served_models(url)
                if BASE_NAME not in models:
                    raise SystemExit(f"agentrl eval: the server at {url} serves {sorted(models)}, not the model as "
                                     f"{BASE_NAME!r}: start it with `agentrl serve-vllm --model {pretrained}` (or "
                                     f"launch/vllm_server.sh), which also turns on runtime LoRA loading")
                root = models[BASE_NAME].get("root")
                if root and Path(root).resolve() != Path(pretrained).resolve():
                    print(f"agentrl eval: warning: the server at {url} serves {root} as {BASE_NAME!r}; the prompts "
                          f"are rendered with the tokenizer of {pretrained}", file=sys.stderr, flush=True)
                version = FOREIGN_SERVER_VERSION + os.getpid()
                while adapter_name(version) in models:
                    version += 1
            else:
                python = vllm_python(args.vllm_python)
                if not Path(python).exists():
                    raise SystemExit(f"agentrl eval: no vLLM python at {python}: run `bash launch/setup_vllm.sh` "
                                     f"(it makes .venv-vllm), or give --vllm_python (or AGENTRL_VLLM_PYTHON) the "
                                     f"interpreter of an environment with vllm installed")
                rank = server_lora_rank(adapter_rank(adapter)) if adapter else 16
                log_dir = args.output_path or tempfile.mkdtemp(prefix="agentrl-eval-")
                log_path = Path(log_dir) / "vllm_server.log"
                server = VLLMServer(pretrained, python=python, max_lora_rank=rank, max_loras=1, log_path=log_path)
                print(f"starting vLLM for {pretrained} (log: {log_path}): {' '.join(server.command())}", flush=True)
                url, version = server.start().url, 1
            if not adapter:
                version = BASE_VERSION
            policy = VLLMPolicy(url, chat.eos_id, version=version, timeout=args.request_timeout)
            trajs = asyncio.run(episodes(policy))
        except PolicyServerError as exc:
            raise SystemExit(f"agentrl eval: {exc}") from None
        finally:
            if server is not None:
                server.stop()
            elif loaded:  # a server that outlives the eval: take our adapter off it (best effort)
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(url.rstrip("/") + "/v1/unload_lora_adapter", json={"lora_name": loaded}, timeout=10)
    where = f" (the server's log: {log_path})" if log_path else ""
    failed = [t for t in trajs if t.status == "policy_error"]
    if failed:
        raise SystemExit(f"agentrl eval: {len(failed)} of {len(trajs)} episodes got no usable answer from the vLLM "
                         f"server at {url}{where}; the first: {failed[0].error}")
    try:
        check_versions(trajs, version)
    except RuntimeError as exc:
        raise SystemExit(f"agentrl eval: {exc}{where}") from None
    served = BASE_NAME if version == BASE_VERSION else adapter_name(version)
    return trajs, {"vllm": {"server": url, "started": server is not None, "served_model": served,
                            "version": version, "log": str(log_path) if log_path else None}}
