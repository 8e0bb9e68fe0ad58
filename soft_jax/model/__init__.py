"""model: the LLaMA-family decoder with sorted exits.

- `config`: `LlamaConfig` (shape, dtypes, exits, remat policy), `RopeScaling`, `preset(name)`.
- `layer_counts`: exit layer counts (`layer_count`, `normalize_exits`, `pair_exit_weights`).
- `exits`: which head serves each exit (`head_index`, `head_kernel`, `head_table`).
- `layers`: one decoder layer (`DecoderLayer`, `rms_norm`, `rope_tables`).
- `transformer`: the scanned stack and head (`init_params`, `exit_hidden_states`,
  `exit_logits`, `head_logits`).
"""
