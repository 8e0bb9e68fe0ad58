"""soft_jax.model.exits: layer counts, the exits to compute, and which head serves each exit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soft_jax.model.config import preset
from soft_jax.model.exits import check_heads, head_index, head_kernel, head_table, uses_shared_head, with_last
from soft_jax.model.layer_counts import layer_count, normalize_exits
from soft_jax.model.layers import DecoderLayer, rope_tables


def test_layer_count_accepts_layer_counts_and_names_the_field():
    assert layer_count(np.int64(3), 4) == 3 and layer_count(4, 4, "exit_layer") == 4
    for bad in (0, 5, 2.0, True, "2", None):
        with pytest.raises(ValueError, match=r"^exit_layer .* 4-layer model \(expected 1..4\)$"):
            layer_count(bad, 4, "exit_layer")
    with pytest.raises(ValueError, match=r"expected 1..3; the last layer is the verifier"):
        layer_count(4, 4, "draft_exit", not_last="the last layer is the verifier")
    with pytest.raises(KeyError):
        layer_count(0, 4, error=KeyError)


def test_exits_are_sorted_with_the_last_layer():
    config = preset("tiny", exits=(3, 2))
    assert normalize_exits(None, 4) == (4,) and normalize_exits(1, 4) == (1, 4)
    assert with_last(config) == (2, 3, 4) and with_last(config, (1,)) == (1, 4)
    with pytest.raises(ValueError, match="exit 5 is not a layer count"):
        with_last(config, (5,))


@pytest.mark.parametrize("tied", [False, True])
def test_head_table_serves_each_exit_from_one_decision(tied):
    shared_cfg = preset("tiny", exits=(2, 3), tie_word_embeddings=tied)
    ict_cfg = shared_cfg.replace(num_exit_heads=2)
    rng = np.random.default_rng(0)
    d, v = shared_cfg.hidden_size, shared_cfg.vocab_size
    # only what the heads read
    shared = {"embed": {"embedding": rng.normal(size=(v, d)).astype(np.float32)}}
    if not tied:
        shared["lm_head"] = {"kernel": rng.normal(size=(d, v)).astype(np.float32)}
    ict = {**shared, "exit_heads": {"kernel": rng.normal(size=(2, d, v)).astype(np.float32)}}
    kernel = shared["embed"]["embedding"].T if tied else shared["lm_head"]["kernel"]
    for e in (1, 2, 3, 4):  # no ICT heads: every layer reads the shared head, row 0
        assert head_index(shared_cfg, shared, e) == 0 and uses_shared_head(shared_cfg, shared, e)
        np.testing.assert_array_equal(head_kernel(shared_cfg, shared, e), kernel)
    table, rows = head_table(shared_cfg, shared, (2, 3, 4))
    assert table.shape[0] == 1 and rows == (0, 0, 0)
    # ICT: exits 2, 3 read their own heads (rows 0, 1), the last layer the shared head (row 2)
    assert [head_index(ict_cfg, ict, e) for e in (2, 3, 4)] == [0, 1, 2]
    table, rows = head_table(ict_cfg, ict, (3, 4))
    assert table.shape[0] == 3 and rows == (1, 2)
    np.testing.assert_array_equal(table[1], ict["exit_heads"]["kernel"][1])
    np.testing.assert_array_equal(head_kernel(ict_cfg, ict, 3), ict["exit_heads"]["kernel"][1])
    assert head_table(ict_cfg, ict, (4,))[0].shape[0] == 1
    with pytest.raises(ValueError, match=r"exit 1 has no head in this ICT model; its exits are"):
        head_index(ict_cfg, ict, 1)
    with pytest.raises(ValueError, match=r"^--exits: \[1\] have no head"):
        check_heads(ict_cfg, ict, (1, 2), "--exits")
    check_heads(shared_cfg, shared, (1, 2), "--exits")


def test_layer_kv_is_what_the_layer_caches():
    config = preset("tiny")
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 3, config.hidden_size))
    cos, sin = rope_tables(config, jnp.arange(3)[None])
    shape = (1, 3, config.num_kv_heads, config.kv_head_dim)
    layer = DecoderLayer(config)
    p = layer.init(jax.random.PRNGKey(0), x, cos, sin)["params"]
    _, cached = layer.apply({"params": p}, x, cos, sin, None,
                            (jnp.zeros(shape), jnp.zeros(shape)), 0)
    kv = layer.apply({"params": p}, x, cos, sin, method=DecoderLayer.kv)
    for a, b in zip(cached, kv):
        np.testing.assert_array_equal(a, b)
