"""reproduce: the paper's story on real weights.

- `plan`: sizes, exits, models and stages; `stages`: `run_stages(run)` (stage-cached);
  `report`: report.md and figures of a run.
- `demo`: `run_demo(cfg, out)`, the embedded default (SoFT and its SFT twin).
"""
