"""Ahead-of-time compile of generation for a TPU chip or tensor-parallel group: greedy and
self-speculative decoding with their KV caches, as shapes (`soft-jax compile --decode`).

What generation holds on the chip is the program's peak: the weights once (on accelerators
`engine.for_decoding` keeps no per-layer copy), the KV cache and the temporaries; with
`split_layers` the per-layer copy CPU decoding keeps is compiled and counted beside the stack.
"""

from __future__ import annotations

from soft_jax.train.compile import (Report, Target, compile_program, gib_of, model_shape, placed,
                                    twin)


def compile_decode(cfg, target: Target, batch: int, max_len: int, draft_exit: int | None,
                   tensor: int, dtype: str, split_layers: bool = False) -> list[Report]:
    """Compile greedy decoding (batch `batch`) and self-speculative decoding (one prompt,
    drafting with `draft_exit`) with caches for `max_len` tokens, weights in `dtype`, on one
    chip or a tensor-parallel group of `tensor` chips. `held_gib` is what generation holds
    on the chip: the program's peak (weights, KV cache, temporaries), plus, with
    `split_layers` (what `decode.for_decoding` does on CPU only), the stacked weights the
    per-layer copy is made from."""
    import jax
    import jax.numpy as jnp

    from soft_jax.infer import engine as decode, speculative
    from soft_jax.model.exits import head_index
    from soft_jax.parallel import sharding as shd

    config, source, draft = _decode_model(cfg, dtype, draft_exit)
    if not 1 <= tensor <= len(target.devices):
        raise ValueError(f"--tensor {tensor}: the slice has {len(target.devices)} chips")
    mesh = shd.build_mesh({"data": 1, "fsdp": 1, "tensor": tensor}, target.devices[:tensor])
    stacked = _sharded_params(config, mesh)
    params = _split_layers(stacked) if split_layers else stacked
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(mesh))
    head = jnp.int32(head_index(config, params, draft))
    common = dict(mesh=shd.describe(mesh), dtype=dtype, max_len=max_len, model=source,
                  params_gib=gib_of(stacked), split_layers=split_layers)
    reports = []
    for mode, rows, extra in (("decode-greedy", batch, 0),
                              ("decode-speculative", 1, speculative.verify_rows(
                                  speculative.MAX_K))):
        slots = decode.cache_slots(max_len + extra)
        cache, s = _cache_shapes(config, rows, slots, mesh), decode.Decoding(max_new=max_len - 1)
        if mode == "decode-greedy":
            vec = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=shd.replicated(mesh))
            lower = lambda c=cache, v=vec, s=s: decode.decode_loop.lower(  # noqa: E731
                config, params, c, v, v, scalar, scalar, scalar, s)
        else:
            lower = lambda c=cache, s=s: speculative.spec_loop.lower(  # noqa: E731
                config, params, c, scalar, scalar, jnp.int32(draft), head, jnp.int32(4),
                speculative.MAX_K, True, s)
        figures = compile_program(lower, target.hbm_gib)
        held = None if figures["peak_gib"] is None else (
            figures["peak_gib"] + (common["params_gib"] if split_layers else 0.0))
        figures["fits"] = figures["fits"] and held <= target.hbm_gib
        reports.append(target.report(mode, figures, batch=rows, kv_cache_gib=gib_of(cache),
                                     cache_slots=slots, held_gib=held,
                                     draft_exit=draft if mode != "decode-greedy" else None,
                                     **common))
    return reports


def _decode_model(cfg, dtype: str, draft_exit: int | None):
    """(model config in `dtype`, its shape's source, the draft exit) for generation."""
    from soft_jax.train.loop import run_model_config

    shape, source = model_shape(cfg)
    config = run_model_config(twin(cfg, **{"model.param_dtype": dtype, "model.dtype": dtype}),
                              shape, 0)
    draft = draft_exit or config.resolved_exits[0]
    if not 1 <= draft < config.num_layers:
        raise ValueError(f"--draft-exit {draft}: expected a layer in 1..{config.num_layers - 1}")
    return config, source, draft


def _sharded_params(config, mesh):
    import jax

    from soft_jax.model.transformer import init_params, param_axes
    from soft_jax.parallel import sharding as shd

    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return placed(params, shd.tree_shardings(params, param_axes(config), mesh))


def _split_layers(params):
    """The per-layer tuple `decode.for_decoding` makes on CPU, as shapes."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    def one(x):
        spec = NamedSharding(x.sharding.mesh, P(*tuple(x.sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=spec)

    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(one, params["layers"]) for _ in range(n))}


def _cache_shapes(config, rows: int, slots: int, mesh):
    import jax

    from soft_jax.parallel import sharding as shd

    shape = (rows, slots, config.num_kv_heads, config.kv_head_dim)
    spec = shd.logical_to_spec(("batch", "activation_length", "activation_kv_heads",
                                "head_dim"), shape, mesh)
    leaf = jax.ShapeDtypeStruct(shape, config.compute_dtype,
                                sharding=jax.sharding.NamedSharding(mesh, spec))
    return tuple((leaf, leaf) for _ in range(config.num_layers))
