"""parallel: how a step is laid out on devices and processes.

- `sharding`: the (data, fsdp, tensor) mesh (`build_mesh`), logical axis names and the one
  rules table (`RULES`, `logical_to_spec`, `tree_shardings` by the axes `boxed_axes` reads
  off a boxed init), activation constraints.
- `distributed`: the multi-process runtime from SLURM, TPU pods or env (`initialize`,
  `is_primary`, `barrier`).
"""
