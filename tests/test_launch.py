"""Launchers: dry-run output is the exact commands and per-process environment; scripts pass
`bash -n` (and shellcheck when installed); the generated SLURM batch script and the TPU
script really run those commands (against stub scontrol / srun / gcloud)."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TRAIN = ["python", "-m", "soft_jax", "train", "--config", "configs/llama2_13b_alpaca_soft.py",
         "--config.mesh.fsdp=-1", "--config.workdir=/shared/runs/it's a run"]


def run(args, env=None, check=True, **kw):
    p = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, **(env or {})}, **kw)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.mark.parametrize("script", ["slurm.sh", "tpu_pod.sh"])
def test_shell_scripts_parse_and_lint(script):
    run(["bash", "-n", LAUNCH / script])
    if shutil.which("shellcheck"):
        run(["shellcheck", LAUNCH / script])
    help_text = run([LAUNCH / script, "--help"]).stdout
    assert "Usage:" in help_text and "--dry-run" in help_text
    bad = run([LAUNCH / script, "--bogus"], check=False)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


# ----------------------------------------------------------------------------- local
def test_local_dry_run_prints_each_process_command_and_env():
    out = run([sys.executable, LAUNCH / "local.py", "--dry-run", "-n", "3",
               "--devices-per-process", "4", "--port", "23456", "--", *TRAIN],
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_foo=1"}).stdout
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        words = shlex.split(line)
        assert words[0] == "env"
        env = dict(w.split("=", 1) for w in words[1:6])
        assert env == {"SOFT_JAX_COORDINATOR": "localhost:23456", "SOFT_JAX_NUM_PROCESSES": "3",
                       "SOFT_JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
                       "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_foo=1"}
        assert words[6:] == TRAIN  # the command, exactly
    gpu = run([sys.executable, LAUNCH / "local.py", "--dry-run", "-n", "2", "--platform", "gpu",
               "--devices-per-process", "2", "--port", "1", "--", "true"]).stdout
    assert "CUDA_VISIBLE_DEVICES=0,1 " in gpu and "CUDA_VISIBLE_DEVICES=2,3 " in gpu


def test_local_launcher_runs_processes_and_stops_all_when_one_fails():
    code = ("import os, sys, time; i = int(os.environ['SOFT_JAX_PROCESS_ID']); "
            "print('hello', i, os.environ['SOFT_JAX_NUM_PROCESSES'], flush=True); "
            "time.sleep(60) if i == 0 else sys.exit(3)")
    p = run([sys.executable, LAUNCH / "local.py", "-n", "2", "--", sys.executable, "-c", code],
            check=False)
    assert p.returncode == 3, p.stdout + p.stderr  # and not after process 0's 60 s sleep
    assert "[p0] hello 0 2" in p.stdout and "[p1] hello 1 2" in p.stdout
    ok = run([sys.executable, LAUNCH / "local.py", "-n", "2", "--", sys.executable, "-c",
              "print('ok')"])
    assert ok.stdout.count("ok") == 2


# ----------------------------------------------------------------------------- SLURM
def test_slurm_dry_run_prints_batch_script_sbatch_and_env_per_process():
    out = run([LAUNCH / "slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "4",
               "--partition", "gpu", "--time", "02:00:00", "--port", "29500", "--", *TRAIN]
              ).stdout
    script, rest = out.split("# submit:\n")
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=4\n" in script
    assert "#SBATCH --gpus-per-node=4\n" in script and "#SBATCH --partition=gpu\n" in script
    assert "#SBATCH --time=02:00:00\n" in script
    assert ('coordinator_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'
            in script)
    srun = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1
    words = shlex.split(srun[0])
    assert words[:5] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=4", "bash", "-c"]
    assert words[5] == ("export SOFT_JAX_PROCESS_ID=$SLURM_PROCID "
                        "SOFT_JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID; exec \"$@\"")
    assert words[7:] == TRAIN
    assert rest.splitlines()[0] == "sbatch slurm-soft_jax.sbatch"
    procs = [ln for ln in rest.splitlines() if ln.startswith("process ")]
    assert len(procs) == 8
    assert procs[5].startswith("process 5 on node 1: SOFT_JAX_COORDINATOR=<first node>:29500 "
                               "SOFT_JAX_NUM_PROCESSES=8 SOFT_JAX_PROCESS_ID=5 "
                               "SOFT_JAX_LOCAL_DEVICE_IDS=1 ")
    per_node = run([LAUNCH / "slurm.sh", "--dry-run", "--nodes", "3", "--gpus-per-node", "8",
                    "--per", "node", "--", "python", "x.py"]).stdout
    assert "#SBATCH --ntasks-per-node=1\n" in per_node
    assert "SOFT_JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7; exec" in per_node
    assert per_node.count("\nprocess ") == 3


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_batch_script_gives_each_task_its_distributed_env(tmp_path):
    from soft_jax.parallel.distributed import detect

    out = run([LAUNCH / "slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "2",
               "--port", "4242", "--", sys.executable, "-c",
               "import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
               "if k.startswith('SOFT_JAX')}))"]).stdout
    script = out.split("# submit:\n")[0].split("\n", 1)[1]
    (tmp_path / "job.sbatch").write_text(script)
    run(["bash", "-n", tmp_path / "job.sbatch"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'printf "gpu-node-7\\ngpu-node-8\\n"\n')
    # srun stub: 2 nodes x --ntasks-per-node tasks, each with SLURM_PROCID / SLURM_LOCALID
    _stub(bin_dir, "srun", """per=1
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks-per-node=* ]] && per="${1#*=}"; shift; done
for ((n = 0; n < 2; n++)); do for ((l = 0; l < per; l++)); do
  SLURM_PROCID=$((n * per + l)) SLURM_LOCALID=$l "$@"
done; done
""")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[7-8]",
           "SLURM_NTASKS": "4"}
    p = run(["bash", tmp_path / "job.sbatch"], env=env)
    import json

    envs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [e["SOFT_JAX_PROCESS_ID"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["SOFT_JAX_LOCAL_DEVICE_IDS"] for e in envs] == ["0", "1", "0", "1"]
    settings = [detect(None, e) for e in envs]
    assert {(s.source, s.coordinator, s.num_processes) for s in settings} == {
        ("explicit", "gpu-node-7:4242", 4)}
    assert [s.local_device_ids for s in settings] == [(0,), (1,), (0,), (1,)]


# ----------------------------------------------------------------------------- TPU pod
def test_tpu_dry_run_prints_exact_gcloud_commands():
    out = run([LAUNCH / "tpu_pod.sh", "--dry-run", "--create", "--name", "soft-v4",
               "--zone", "us-central2-b", "--project", "my-proj", "--accelerator", "v4-32",
               "--preflight-python", "python3", "--", *TRAIN]).stdout
    cmds = [shlex.split(ln) for ln in out.splitlines() if not ln.startswith("#")]
    # first the preflight: the step compiled here for the pod's slice, the train args as given
    assert "# preflight (in " in out
    assert cmds.pop(0) == ["python3", "-m", "soft_jax", "compile", "--topology", "v4-32",
                           "--slices", "1", *TRAIN[4:]]
    common = ["--zone=us-central2-b", "--project=my-proj"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "soft-v4", *common,
                       "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
    assert cmds[1][:4] == ["tar", "czf", "/tmp/soft-v4-soft_jax-src.tar.gz", "-C"]
    assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                       "/tmp/soft-v4-soft_jax-src.tar.gz", "soft-v4:~/soft_jax-src.tar.gz",
                       "--worker=all", *common]
    assert cmds[3][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "soft-v4",
                           "--worker=all"]
    install = cmds[3][-1].split("=", 1)[1]
    assert "pip install -q -U 'jax[tpu]' -e ." in install
    start = cmds[4]
    assert start[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "soft-v4",
                         "--worker=all", *common]
    remote = shlex.split(start[9].split("=", 1)[1])  # what every host's shell runs
    assert remote[:4] == ["cd", "~/soft_jax", "&&", "SOFT_JAX_DISTRIBUTED=1"]
    assert remote[4:] == TRAIN
    assert len(cmds) == 5
    assert "# every host runs: cd ~/soft_jax && SOFT_JAX_DISTRIBUTED=1 python -m" in out


def test_tpu_multislice_and_real_run_calls_gcloud_exactly_as_printed(tmp_path):
    args = ["--name", "ms", "--zone", "z", "--num-slices", "2", "--no-install",
            "--skip-preflight", "--", "python", "-m", "soft_jax", "train",
            "--config.mesh.dcn_data=2"]
    dry = run([LAUNCH / "tpu_pod.sh", "--dry-run", "--create", *args]).stdout
    assert "# preflight skipped (--skip-preflight)" in dry
    printed = [ln for ln in dry.splitlines() if not ln.startswith("#")]
    assert printed[0] == ("gcloud compute tpus queued-resources create ms --zone=z "
                          "--accelerator-type=v5p-32 --runtime-version=tpu-ubuntu2204-base "
                          "--node-count=2 --node-prefix=ms")
    assert [shlex.split(ln)[5] for ln in printed[1:]] == ["ms-0", "ms-1"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"  # one file per call: the slices' ssh calls run concurrently
    calls.mkdir()
    _stub(bin_dir, "gcloud", f'printf "%q " gcloud "$@" > "$(mktemp {calls}/call.XXXXXX)"\n')
    run([LAUNCH / "tpu_pod.sh", *args], env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    called = sorted(shlex.split(f.read_text()) for f in calls.iterdir())
    assert called == sorted(shlex.split(ln) for ln in printed[1:])
    assert detect_tpu_env()


@pytest.mark.parametrize("preflight_status", [0, 3])
def test_tpu_preflight_runs_first_and_refuses_a_step_that_does_not_fit(tmp_path,
                                                                       preflight_status):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    _stub(bin_dir, "gcloud", f'echo gcloud "$@" >> {calls}\n')
    _stub(bin_dir, "py", f'echo preflight "$@" >> {calls}\nexit {preflight_status}\n')
    args = ["--name", "p", "--zone", "z", "--accelerator", "v5litepod-16", "--no-install",
            "--preflight-python", bin_dir / "py", "--", "soft-jax", "train",
            "--config", "configs/tiny.py", "--config.mesh.fsdp=-1"]
    p = run([LAUNCH / "tpu_pod.sh", *args], env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
            check=False)
    lines = calls.read_text().splitlines()
    assert lines[0] == ("preflight -m soft_jax compile --topology v5litepod-16 --slices 1 "
                        "--config configs/tiny.py --config.mesh.fsdp=-1")
    assert p.returncode == preflight_status, p.stdout + p.stderr
    if preflight_status:  # refused before any gcloud call
        assert lines == lines[:1] and "does not fit v5litepod-16" in p.stderr
        assert "--skip-preflight" in p.stderr
    else:
        assert lines[1].startswith("gcloud compute tpus tpu-vm ssh p --worker=all")


def detect_tpu_env():
    from soft_jax.parallel.distributed import detect

    return (detect(None, {"SOFT_JAX_DISTRIBUTED": "1"}).source == "forced"
            and detect(None, {"TPU_WORKER_HOSTNAMES": "w0,w1"}).source == "tpu")
