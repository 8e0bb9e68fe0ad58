"""Every `soft-jax COMMAND --help` (and `python -m soft_jax COMMAND --help`) runs and prints no
warning of its own making, and `soft_jax.generate` is the generate function whatever CLI
module was imported first."""

import shutil
import subprocess
import sys
from pathlib import Path

import soft_jax as sj
from soft_jax.cli.main import COMMANDS
from soft_jax.infer.generate import generate

# command -> a word its --help prints; every command exits 0 after --help.
HELP_WORDS = {"convert": "from-hf", "generate": "--draft-exit", "train": "--config.optimizer.lr",
              "eval": "--tasks", "harness": "--tasks", "memory": "--preset", "compile": "--topology", "demo": "--steps",
              "reproduce": "--report-only"}
SCRIPT = Path(sys.executable).with_name("soft-jax")


def test_every_command_help_runs_without_warnings():
    assert set(HELP_WORDS) == set(COMMANDS)
    script = str(SCRIPT) if SCRIPT.is_file() else shutil.which("soft-jax")
    assert script, "the soft-jax console script is installed with the package"
    procs = {cmd: subprocess.Popen([script, cmd, "--help"] if i % 2 else
                                   [sys.executable, "-m", "soft_jax", cmd, "--help"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, cmd in enumerate(COMMANDS)}  # concurrently: mostly interpreter start-up
    for cmd, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (cmd, err)
        assert HELP_WORDS[cmd] in out, cmd
        assert "warning" not in err.lower(), (cmd, err)


def test_top_level_usage_and_unknown_command():
    r = subprocess.run([sys.executable, "-m", "soft_jax", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and all(cmd in r.stdout for cmd in COMMANDS)
    r = subprocess.run([sys.executable, "-m", "soft_jax", "trian"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown command 'trian'")


def test_generate_function_survives_importing_the_cli_module():
    assert sj.__getattr__("generate") is generate  # the package's export is the function
    import soft_jax.cli.generate as cli

    assert callable(cli.main) and cli.generate is generate
    assert sj.generate is generate  # importing the command did not rebind the export
