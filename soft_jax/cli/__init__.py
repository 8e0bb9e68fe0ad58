"""cli: the `soft-jax` command (`python -m soft_jax` does the same), one module per subcommand.

    soft-jax train | convert | generate | eval | harness | memory | reproduce | demo  [--help]

Every subcommand parses its flags with `cli.flags` (`--config FILE` plus `--config.x=y` where
it has a config) and turns bad input into one `error:` line and exit 2. Only this wing
imports it; the library wings below never import a command.
"""
