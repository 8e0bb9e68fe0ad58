"""train: fine-tuning with one loss over every exit.

- `loop`: `train(cfg)` runs or resumes a job; `run_config`: the config schema and `validate`;
  `modes`: what soft / sft / ict / sortednet train.
- `step`: `TrainState`, `StepSettings`, `make_train_step` (jitted, sharded).
- `loss` / `chunked_loss`: `exit_loss` and the chunked multi-exit cross-entropy.
- `heldout`: `per_exit_metrics`; `memory`: the per-device memory `plan`; `run_log`: metrics
  files and TensorBoard; `flops`: model FLOPs of a step.
"""
