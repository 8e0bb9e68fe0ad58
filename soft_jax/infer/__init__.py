"""infer: decoding with the sub-models on a jitted KV-cache engine.

- `generate`: `generate(config, params, prompt_ids, ...)` (exported as `soft_jax.generate`).
- `engine`: the cache, prefill and decode loop (`Decoding`, `for_decoding`, `decode_loop`).
- `speculative`: self-speculation (draft exit n, verify layers n+1..L).
- `dynamic`: per-token dynamic exit with exact catch-up.
"""
