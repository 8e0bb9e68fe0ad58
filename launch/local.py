#!/usr/bin/env python3
"""Local multi-process launcher: N copies of one command on this machine, wired together
through jax.distributed (process 0 hosts the coordinator on localhost).

    python launch/local.py --num-processes 2 --devices-per-process 4 --platform cpu -- \\
        python -m soft_jax train --config configs/tiny.py --config.mesh.fsdp=8

Every process gets SOFT_JAX_COORDINATOR=localhost:PORT, SOFT_JAX_NUM_PROCESSES=N and its
SOFT_JAX_PROCESS_ID (read by soft_jax/parallel/distributed.py). `--platform cpu` also sets
JAX_PLATFORMS=cpu and --xla_force_host_platform_device_count (fake devices, CPU collectives
over gloo); `--platform gpu` gives each process its own CUDA_VISIBLE_DEVICES slice.
`--dry-run` prints the exact command lines (with their environment) and starts nothing.
Output lines are prefixed with [pI]; if one process fails the others are stopped and the
launcher exits with the failing status.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _xla_flags(inherited: str, devices: int) -> str:
    keep = [f for f in inherited.split() if not f.startswith(
        "--xla_force_host_platform_device_count")]
    return " ".join([f"--xla_force_host_platform_device_count={devices}"] + keep)


def process_envs(num_processes: int, port: int, platform: str, devices_per_process: int,
                 host: str = "localhost", inherited_xla_flags: str = "") -> list[dict]:
    """The environment variables each process gets on top of the launcher's own."""
    envs = []
    for i in range(num_processes):
        env = {"SOFT_JAX_COORDINATOR": f"{host}:{port}",
               "SOFT_JAX_NUM_PROCESSES": str(num_processes),
               "SOFT_JAX_PROCESS_ID": str(i)}
        if platform == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = _xla_flags(inherited_xla_flags, devices_per_process)
        elif platform == "gpu":
            first = i * devices_per_process
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                str(d) for d in range(first, first + devices_per_process))
        envs.append(env)
    return envs


def command_line(env: dict, cmd: list[str]) -> str:
    """`env K=V ... cmd` exactly as a shell would need it."""
    return " ".join(["env"] + [f"{k}={shlex.quote(v)}" for k, v in env.items()]
                    + [shlex.quote(c) for c in cmd])


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def launch(cmd: list[str], envs: list[dict], timeout: float | None = None) -> int:
    """Start one process per env, stream their output, return the first non-zero status."""
    procs = []
    threads = []
    for i, extra in enumerate(envs):
        p = subprocess.Popen(cmd, env={**os.environ, **extra}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", sys.stdout),
                             daemon=True)
        t.start()
        procs.append(p)
        threads.append(t)
    status = 0
    try:
        remaining = list(procs)
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while remaining:
            for p in list(remaining):
                rc = p.poll()
                if rc is None:
                    continue
                remaining.remove(p)
                if rc != 0 and status == 0:
                    status = rc
                    for q in remaining:  # one failed: the others would wait on it forever
                        q.send_signal(signal.SIGTERM)
            if deadline is not None and time.monotonic() > deadline and remaining:
                for q in remaining:
                    q.kill()
                status = status or 124
                deadline = None
            if remaining:
                time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        status = status or 130
    for t in threads:
        t.join(timeout=5)
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 usage="%(prog)s [options] -- command [args...]")
    ap.add_argument("--num-processes", "-n", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=4,
                    help="cpu: fake devices per process; gpu: GPUs per process")
    ap.add_argument("--platform", choices=("cpu", "gpu", "auto"), default="cpu",
                    help="auto: leave device selection to jax")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    ap.add_argument("--host", default="localhost", help="coordinator host")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before killing all")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        opts, cmd = argv[:split], argv[split + 1:]
    else:
        opts, cmd = argv, []
    a = ap.parse_args(opts)
    if not cmd:
        ap.error("no command given (put it after --)")
    if a.num_processes < 1 or a.devices_per_process < 1:
        ap.error("--num-processes and --devices-per-process must be >= 1")
    port = a.port or free_port()
    envs = process_envs(a.num_processes, port, a.platform, a.devices_per_process, a.host,
                        os.environ.get("XLA_FLAGS", ""))
    if a.dry_run:
        print(f"# {a.num_processes} processes, coordinator {a.host}:{port} (process 0), "
              f"platform {a.platform}, {a.devices_per_process} device(s) each")
        for env in envs:
            print(command_line(env, cmd))
        return 0
    return launch(cmd, envs, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
