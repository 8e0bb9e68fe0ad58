"""Every `python -m soft_jax.<cli> --help` runs and prints no warning of its own making (e.g.
runpy's "found in sys.modules" when the package imports its CLI modules), and
`soft_jax.generate(...)` calls the generate function whichever of its names is imported first."""

import subprocess
import sys

import soft_jax as sj
from soft_jax.generation import generate

# CLI -> a word its --help prints; every CLI exits 0 after --help.
CLIS = {"convert": "from-hf", "generate": "--draft-exit", "train": "--config", "eval": "--tasks",
        "eval.harness": "--tasks", "memory": "--preset", "demo": "--steps"}


def test_every_cli_help_runs_without_warnings():
    procs = {cli: subprocess.Popen([sys.executable, "-m", f"soft_jax.{cli}", "--help"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cli in CLIS}  # concurrently: each is mostly interpreter and jax start-up
    for cli, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (cli, err)
        assert CLIS[cli] in out, cli
        assert "warning" not in err.lower(), (cli, err)


def test_generate_function_survives_importing_the_cli_module(monkeypatch):
    assert sj.__getattr__("generate") is generate  # the package's export is the function
    import soft_jax.generate as cli  # Python binds this module as soft_jax.generate ...

    assert callable(cli.main) and cli.generate is generate
    monkeypatch.setattr(cli, "generate", lambda *args, **kw: (args, kw))
    assert sj.generate(1, 2, [3], 4, seed=5) == ((1, 2, [3], 4), {"seed": 5})  # ... calling it
