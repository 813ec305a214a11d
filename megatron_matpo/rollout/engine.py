"""SGLang rollout engines: the SGLang seam.

Each engine is a real SGLang server process (`python -m sglang.launch_server`; on CPU through
`sglang_main`, which forks SGLang's child processes instead of spawning them), on CPU with the
switches that work there (see ../shared/STACK.md) and on GPU with the configured TP. Rollouts talk
to it over its HTTP API with token ids in and token ids + logprobs out, so trajectories are built
from the engine's own ids (never re-tokenized text).
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from megatron_matpo.compat import sglang_cpu_pythonpath, sglang_engine_env
from megatron_matpo.ports import free_port


@dataclass
class EngineConfig:
    model_path: str
    tp_size: int = 1
    dtype: str = "auto"  # fp32 on CPU where "auto" would pick the checkpoint's dtype
    mem_fraction_static: float = 0.05  # of host RAM on CPU; raise it on GPU (e.g. 0.6 colocated)
    max_total_tokens: int | None = None  # KV pool size (--max-total-tokens); None: from free memory
    context_length: int | None = None
    random_seed: int = 0
    # where the server listens: loopback for one machine; a Ray-placed engine uses its node's address
    # so that the controller and actor ranks on other nodes can reach it
    host: str = "127.0.0.1"
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0
    log_dir: str | None = None  # engine stdout/stderr go here (one file per engine)
    # CPU engines: torch threads of the server (its OMP_NUM_THREADS); 0 = the machine's cores. Launchers
    # divide the cores among the engines they start: an engine decodes while the actor ranks wait
    cpu_threads: int = 0
    # CPU engines: fork SGLang's child processes instead of spawning them (compat.sglang_fork_children)
    fork_children: bool = True
    extra_args: list[str] = field(default_factory=list)
    # "cpu" | "cuda" | "auto" (= this process's platform, which imports torch): the controller resolves it
    # (`EngineSection.engine_config`), so a Ray engine host starts its server without importing torch first
    device: str = "auto"

    def on_cuda(self) -> bool:
        if self.device == "auto":
            from megatron_matpo import platform

            return platform.capabilities().cuda
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"EngineConfig.device must be cpu, cuda or auto, not {self.device!r}")
        return self.device == "cuda"


@dataclass
class Generation:
    output_ids: list[int]
    logprobs: list[float]  # one per output id, from the engine's sampling distribution
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the thread that forked it dies (Linux
    PR_SET_PDEATHSIG; a no-op elsewhere)."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class EngineServer:
    """Owns one SGLang server process."""

    def __init__(self, cfg: EngineConfig, gpu_ids: list[int] | None = None):
        self.cfg = cfg
        self.port = free_port()
        self.url = f"http://{cfg.host}:{self.port}"
        self.gpu_ids = gpu_ids
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        c = self.cfg
        cpu = not c.on_cuda()
        entry = "megatron_matpo.rollout.sglang_main" if cpu and c.fork_children else "sglang.launch_server"
        cmd = [sys.executable, "-m", entry, "--model-path", c.model_path,
               "--host", c.host, "--port", str(self.port), "--tp-size", str(c.tp_size),
               "--mem-fraction-static", str(c.mem_fraction_static), "--random-seed", str(c.random_seed),
               "--skip-server-warmup", "--log-level", "warning"]
        dtype = c.dtype
        if cpu:
            # --sleep-on-idle: an idle scheduler otherwise spins at ~80% of a core, which starves the
            # actor ranks sharing a small CPU box
            cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                    "--sleep-on-idle"]
            dtype = "float32" if dtype == "auto" else dtype
        cmd += ["--dtype", dtype]
        if c.context_length:
            cmd += ["--context-length", str(c.context_length)]
        if c.max_total_tokens:
            cmd += ["--max-total-tokens", str(c.max_total_tokens)]
        return cmd + list(c.extra_args)

    def start(self) -> "EngineServer":
        env, cpu = dict(os.environ), not self.cfg.on_cuda()
        if cpu:
            env["PYTHONPATH"] = os.pathsep.join([sglang_cpu_pythonpath(), env.get("PYTHONPATH", "")])
            env["OMP_NUM_THREADS"] = str(self.cfg.cpu_threads or os.cpu_count() or 1)
        sglang_engine_env(env, cpu=cpu)
        if self.gpu_ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpu_ids))
        log_dir = Path(self.cfg.log_dir) if self.cfg.log_dir else None
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(log_dir / f"engine-{self.port}.log", "w")
        out = self._log or subprocess.DEVNULL
        # own session (a Ctrl-C meant for the trainer does not hit the engine mid-request), but it dies
        # with this process: a SIGKILLed trainer (or Ray actor) must not leave a 2 GB server behind.
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so a dedicated thread forks and
        # then waits on the server for its whole life (callers, e.g. Ray actor tasks, may run on
        # short-lived threads). SGLang's own subprocesses follow launch_server when it dies.
        cmd, spawned, box = self.command(), threading.Event(), {}

        def spawn() -> None:
            try:
                box["proc"] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True, preexec_fn=_die_with_parent)
            except BaseException as e:  # handed to the caller below
                box["error"] = e
            spawned.set()
            if "proc" in box:
                box["proc"].wait()

        threading.Thread(target=spawn, name=f"sglang-engine-{self.port}", daemon=True).start()
        spawned.wait()
        if "error" in box:
            raise box["error"]
        self.proc = box["proc"]
        return self

    def wait_ready(self) -> "EngineServer":
        deadline = time.time() + self.cfg.startup_timeout_s
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"SGLang engine exited with code {self.proc.returncode} during start-up"
                                   + (f"; see {self._log.name}" if self._log else "; set log_dir to see why"))
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SGLang engine at {self.url} not ready after {self.cfg.startup_timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal

            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._log:
            self._log.close()
            self._log = None


# SGLang's HTTP server (uvicorn) closes a keep-alive connection after SGLANG_TIMEOUT_KEEP_ALIVE idle
# seconds (5 in 0.5.23), and httpx's pool keeps one for 5 s by default: a request sent on a pooled
# connection just as the server closes it fails with ReadError / RemoteProtocolError. It happens at
# the first rollout after a training phase, more often on a loaded machine. Our pool drops idle
# connections well before the server does, and a request that failed that way is sent once more on
# a fresh connection (SGLang aborts the first one when its client disconnects).
KEEPALIVE_EXPIRY_S = 2.0
_STALE_CONNECTION = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class EngineClient:
    """Async client of one engine's HTTP API."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        self.url = url
        self.timeout_s = timeout_s
        self.in_flight = 0
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=64,
                                  keepalive_expiry=KEEPALIVE_EXPIRY_S)
            self._client = httpx.AsyncClient(timeout=self.timeout_s, limits=limits)
        return self._client

    async def generate(self, input_ids: list[int], sampling: dict) -> Generation:
        payload = {"input_ids": input_ids, "sampling_params": sampling, "return_logprob": True,
                   "logprob_start_len": len(input_ids)}
        self.in_flight += 1
        try:
            try:
                r = await self._http().post(f"{self.url}/generate", json=payload)
            except _STALE_CONNECTION:
                r = await self._http().post(f"{self.url}/generate", json=payload)
            r.raise_for_status()
            body = r.json()
        finally:
            self.in_flight -= 1
        meta = body["meta_info"]
        lps = meta.get("output_token_logprobs") or []
        ids = body.get("output_ids") or [t[1] for t in lps]
        if len(lps) != len(ids):
            raise RuntimeError(f"engine returned {len(ids)} ids but {len(lps)} logprobs")
        reason = (meta.get("finish_reason") or {}).get("type", "stop")
        return Generation(output_ids=list(ids), logprobs=[float(t[0]) for t in lps], finish_reason=reason,
                          prompt_tokens=int(meta.get("prompt_tokens", len(input_ids))))

    async def post(self, route: str, payload: dict | None = None) -> dict:
        r = await self._http().post(f"{self.url}/{route}", json=payload or {})
        r.raise_for_status()
        return r.json() if r.content else {}

    async def flush_cache(self) -> None:
        """Flush the radix/KV cache, raising when the engine refuses (it does while requests run).
        /flush_cache answers plain text, not JSON."""
        r = await self._http().post(f"{self.url}/flush_cache")
        if r.status_code != 200:
            raise RuntimeError(f"engine {self.url} refused to flush its cache (HTTP {r.status_code}): "
                               f"{r.text.strip()} -- weight syncs need idle engines")

    # ---- colocated engines: hand the GPU memory to the actor while it trains ----------------------

    async def release_memory(self, tags: list[str] | None = None) -> None:
        """Free the engine's `weights` and/or `kv_cache` (all when None) until `resume_memory`. With
        --enable-memory-saver (GPU) the memory really goes back to the device; without it SGLang
        keeps the memory and answers the same, so the sequence is the same on CPU."""
        await self._memory_route("release_memory_occupation", tags)

    async def resume_memory(self, tags: list[str] | None = None) -> None:
        await self._memory_route("resume_memory_occupation", tags)

    async def _memory_route(self, route: str, tags: list[str] | None) -> None:
        r = await self._http().post(f"{self.url}/{route}", json={"tags": tags} if tags else {})
        if r.status_code != 200:
            raise RuntimeError(f"engine {self.url} /{route} {tags or 'all'} failed (HTTP {r.status_code}): "
                               f"{r.text.strip()[:500]}")

    async def update_weights_from_disk(self, model_path: str) -> None:
        res = await self.post("update_weights_from_disk", {"model_path": model_path})
        if not res.get("success", False):
            raise RuntimeError(f"engine {self.url} refused weights from {model_path}: {res.get('message')}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- prefill logprobs (parity checks) -------------------------------------------------------

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """log p(token j | tokens < j) for every position of an existing sequence, from a prefill
        only (no token generated). Entry 0 has no prediction and is None."""
        self.in_flight += 1
        try:
            r = await self._http().post(f"{self.url}/generate", json={
                "input_ids": token_ids, "return_logprob": True, "logprob_start_len": 0,
                # temperature 1: the model's own distribution, whatever generation_config says
                "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}})
            r.raise_for_status()
            lps = r.json()["meta_info"]["input_token_logprobs"]
        finally:
            self.in_flight -= 1
        if len(lps) != len(token_ids):
            raise RuntimeError(f"engine {self.url} returned {len(lps)} prompt logprobs for {len(token_ids)} tokens")
        return [None] + [float(t[0]) for t in lps[1:]]

    # ---- weight updates (SGLang 0.5.23 HTTP routes) ---------------------------------------------

    async def _weight_route(self, route: str, payload: dict | None = None) -> dict:
        """POST a weight-update route. SGLang answers {"success", "message"}, with HTTP 400 on
        failure; the message is what says why, so it goes into the error."""
        r = await self._http().post(f"{self.url}/{route}", json=payload or {})
        try:
            body = r.json()
        except ValueError:
            body = {"success": False, "message": r.text}
        if r.status_code != 200 or not body.get("success", False):
            raise RuntimeError(f"engine {self.url} /{route} failed (HTTP {r.status_code}): {body.get('message')}")
        return body

    async def server_info(self) -> dict:
        r = await self._http().get(f"{self.url}/server_info")
        r.raise_for_status()
        return r.json()

    async def begin_weight_update(self) -> None:
        """Open the weight-update session that 0.5.23 requires around update_weights_from_tensor /
        update_weights_from_distributed (not around update_weights_from_disk)."""
        await self._weight_route("begin_weight_update")

    async def end_weight_update(self) -> None:
        await self._weight_route("end_weight_update")

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str) -> None:
        """Join the trainer's broadcast group (engine TP rank r takes rank rank_offset + r). Blocks
        until every member, the trainer's rank 0 included, has joined."""
        await self._weight_route("init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._weight_route("destroy_weights_update_group", {"group_name": group_name})

    async def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                              group_name: str, load_format: str | None = None,
                                              flush_cache: bool = False) -> dict:
        """Receive tensors broadcast from group rank 0 and load them. Blocks until the broadcast
        completes, so the trainer must broadcast concurrently. Returns SGLang's answer."""
        return await self._weight_route("update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "load_format": load_format, "flush_cache": flush_cache})

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], load_format: str | None = None,
                                         flush_cache: bool = False) -> dict:
        """Load tensors from base64 MultiprocessingSerializer payloads, one per engine TP rank. Returns
        SGLang's answer."""
        return await self._weight_route("update_weights_from_tensor", {
            "serialized_named_tensors": serialized_named_tensors, "load_format": load_format,
            "flush_cache": flush_cache})


class EngineRouter:
    """Spreads requests over several engines: each request goes to the engine with the fewest
    requests in flight (ties to the lowest index), which balances long and short generations."""

    def __init__(self, clients: list[EngineClient]):
        if not clients:
            raise ValueError("EngineRouter needs at least one engine")
        self.clients = clients
        self.assigned = [0] * len(clients)

    async def generate(self, input_ids: list[int], sampling: dict) -> Generation:
        i = min(range(len(self.clients)), key=lambda j: (self.clients[j].in_flight, j))
        self.assigned[i] += 1
        return await self.clients[i].generate(input_ids, sampling)

    async def broadcast(self, method: str, *args) -> None:
        await asyncio.gather(*(getattr(c, method)(*args) for c in self.clients))

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


def launch_engines(cfg: EngineConfig, n: int) -> list[EngineServer]:
    """Start `n` engines in parallel and wait for all (GPUs split `tp_size` each on CUDA)."""
    servers = []
    for i in range(n):
        gpus = list(range(i * cfg.tp_size, (i + 1) * cfg.tp_size)) if cfg.on_cuda() else None
        servers.append(EngineServer(cfg, gpus).start())
    try:
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers
