"""data: training and eval text, from rows to packed batches.

- `formats`: row formats and chat templates (`FORMATS`, `TEMPLATES`, `load_rows`,
  `tokenize_rows`, `prompt_ids_for`), packing with segment ids (`pack_examples`,
  `BatchStream`).
- `tokenizer`: `load_tokenizer(spec)` for HF folders, hub names, `gguf:FILE` and `bpe:N`.
"""
