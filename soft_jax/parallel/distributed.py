"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

Where the settings come from, first match wins:

1. explicit config fields `distributed.coordinator` / `num_processes` / `process_id`
   (/ `local_device_ids`), then the environment variables SOFT_JAX_COORDINATOR,
   SOFT_JAX_NUM_PROCESSES, SOFT_JAX_PROCESS_ID (/ SOFT_JAX_LOCAL_DEVICE_IDS) -- what
   launch/local.py and launch/slurm.sh set;
2. a SLURM job step with more than one task (srun): jax's own SLURM detection (coordinator =
   first node of the step, process id = SLURM_PROCID, one GPU per task via SLURM_LOCALID
   unless local_device_ids says otherwise);
3. a Cloud TPU pod (more than one host in TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES, or a
   multi-slice MEGASCALE_COORDINATOR_ADDRESS): jax's own TPU detection;
4. `distributed.mode = "on"` (or SOFT_JAX_DISTRIBUTED=1): `jax.distributed.initialize()`
   with whatever jax detects;
5. otherwise a single process: nothing is initialised.

It must run before anything touches a jax backend (train() calls it first).
"""

from __future__ import annotations

import dataclasses
import os

import jax

ENV_COORDINATOR = "SOFT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "SOFT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SOFT_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SOFT_JAX_LOCAL_DEVICE_IDS"
ENV_FORCE = "SOFT_JAX_DISTRIBUTED"
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """What `initialize` would do: `source` says why ("explicit", "slurm", "tpu", "forced",
    or "single" for no initialisation)."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _get(cfg, key, default):
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _ids(value) -> tuple[int, ...] | None:
    if value in (None, "", ()):
        return None
    if isinstance(value, str):
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def detect(cfg=None, environ=None) -> DistributedSettings:
    """The settings `initialize(cfg)` would use in this environment (pure: no jax calls)."""
    env = os.environ if environ is None else environ
    mode = str(_get(cfg, "mode", "auto") or "auto")
    if mode not in MODES:
        raise ValueError(f"distributed.mode={mode!r}; expected one of {MODES}")
    if mode == "off":
        return DistributedSettings("single")
    coordinator = _get(cfg, "coordinator", "") or env.get(ENV_COORDINATOR, "")
    num = int(_get(cfg, "num_processes", 0) or env.get(ENV_NUM_PROCESSES, 0) or 0)
    pid = _get(cfg, "process_id", -1)
    pid = int(pid if pid is not None and int(pid) >= 0 else env.get(ENV_PROCESS_ID, -1))
    local = _ids(_get(cfg, "local_device_ids", "") or env.get(ENV_LOCAL_DEVICE_IDS, ""))
    if coordinator or num > 1:
        missing = [n for n, bad in (("coordinator", not coordinator), ("num_processes", num < 1),
                                    ("process_id", pid < 0)) if bad]
        if missing:
            raise ValueError(f"distributed settings incomplete, missing {missing} (config "
                             f"distributed.* or {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / "
                             f"{ENV_PROCESS_ID})")
        if not 0 <= pid < num:
            raise ValueError(f"process_id={pid} is not in [0, num_processes={num})")
        if num == 1:
            return DistributedSettings("single")
        return DistributedSettings("explicit", coordinator, num, pid, local)
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1)
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ntasks > 1:
        return DistributedSettings("slurm", local_device_ids=local)
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return DistributedSettings("tpu", local_device_ids=local)
    if mode == "on" or env.get(ENV_FORCE, "") not in ("", "0"):
        return DistributedSettings("forced", local_device_ids=local)
    return DistributedSettings("single")


def initialize(cfg=None, environ=None) -> DistributedSettings:
    """Start jax's multi-process runtime if the config / environment asks for it.

    Idempotent: returns at once when jax.distributed is already initialised. On CPU, the
    cross-process collectives need `distributed.cpu_collectives` ("gloo", the default).
    """
    settings = detect(cfg, environ)
    if settings.source == "single":
        return settings
    if jax.distributed.is_initialized():
        return settings
    collectives = _get(cfg, "cpu_collectives", "gloo")
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    kwargs = {}
    timeout = int(_get(cfg, "initialization_timeout", 0) or 0)
    if timeout:
        kwargs["initialization_timeout"] = timeout
    jax.distributed.initialize(
        coordinator_address=settings.coordinator, num_processes=settings.num_processes,
        process_id=settings.process_id,
        local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        **kwargs)
    return settings


def is_primary() -> bool:
    """Process 0 (the one that logs and writes single-writer files)."""
    return jax.process_index() == 0


def primary_says(flag: bool) -> bool:
    """Process 0's `flag` on every process (a collective; the flag itself in one process)."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def barrier(name: str) -> None:
    """All processes wait here (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
