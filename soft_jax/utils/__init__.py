"""utils: what every wing shares and nothing of soft_jax's own.

- `log`: progress lines from process 0 (`log`, `one_line`, `filtered`).
- `tables`: the Markdown table every report writes (`markdown_table`).
- `plot`: the per-exit line figures (`per_exit_figure`).
- `config_file`: `load_config_file(path)` of an ml_collections `.py` config.
- `platforms`: jax's platform list decided before its backends start (no TPU probing on a
  host without TPU chips), and the environment of a compile-only TPU process.
"""
