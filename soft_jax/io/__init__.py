"""io: weights in and out.

- `hf`: Hugging Face folders <-> soft_jax (`load_hf`, `save_hf` with sub-model export,
  `checkpoint_from_hf`).
- `gguf`: GGUF -> plain HF folder (`hf_from_gguf`).
- `checkpoint`: atomic, checksummed Orbax checkpoints (`TrainCheckpoints`, `save_params`,
  `load_params`).
- `loading`: `load_model(path)` -> `LoadedModel` for checkpoints, work dirs, HF folders, hubs.
"""
