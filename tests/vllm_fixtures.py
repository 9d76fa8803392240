"""Shared pieces of the vLLM tests (tests/test_vllm*.py): run settings for the embedded SmolLM2 and a
real local ``vllm serve`` on 127.0.0.1 (never any other address)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# A 3-step S-GRPO run on the embedded model sized for 2 CPU cores (vLLM: fp32, 512-token context).
RUN = [
    "recipe=demo", "prompts_per_step=3", "algo.group_size=4", "generation.max_new_tokens=16", "eval_limit=2",
    "eval_before=false", "eval_every=0", "save_every=1", "keep_checkpoints=3", "max_minutes=null", "lora.r=8", "lora.alpha=16",
    "generation.backend=vllm", "vllm.max_model_len=512", "vllm.kv_cache_gib=0.5",
    "optim.lr=1e-3", "num_threads=1",
]

# The environment of the vLLM processes the tests start: one thread, no core pinning, a small KV cache.
VLLM_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``vllm serve <model> --enable-lora`` (runtime LoRA updating on) on 127.0.0.1, started and stopped by
    the test."""

    def __init__(self, model: str, log_path: Path, max_lora_rank: int = 8, timeout_s: float = 420):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # `vllm serve` itself: vllm-cpu 0.32's `vllm` command looks up the version of a package named
        # "vllm" and stops (the CPU build is named vllm-cpu); the server module is the same server.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "1",
               "--served-model-name", "base"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV})
        self._wait(timeout_s, log_path)

    def _wait(self, timeout_s: float, log_path: Path) -> None:
        import httpx

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}): {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vllm serve did not answer within {timeout_s}s: {log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
