"""Decoding: KV-cached greedy vs full recomputation, padding, self-speculation (lossless greedy,
distribution-preserving sampling), dynamic early exit with exact catch-up, API errors, CLI."""

import json
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import soft_jax as sj
from soft_jax.infer import dynamic
from soft_jax.infer import engine as decode
from soft_jax.infer.dynamic import PAPER_THRESHOLDS, default_thresholds
import soft_jax.cli.generate as cli
from soft_jax.cli.generate import main
from soft_jax.infer.generate import Generation, generate
from soft_jax.infer.speculative import accept_drafts, spec_loop

SHAPES = {  # GQA + untied head; MHA + explicit head_dim + tied embeddings
    "gqa": dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                num_kv_heads=2, head_dim=8, exits=(1, 2, 3)),
    "tied": dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=3, num_heads=2,
                 num_kv_heads=2, head_dim=8, tie_word_embeddings=True, exits=(1, 2)),
}
CASES = [("gqa", 0), ("gqa", 3), ("tied", 1)]
PROMPT, N = [5, 7, 9, 11, 3], 10


@lru_cache(maxsize=None)
def model(shape: str, seed: int):
    """A tiny random model whose head is scaled up: 0.02-scale random weights give nearly
    uniform next-token distributions, whose near-ties would make argmax comparisons flaky."""
    cfg = sj.LlamaConfig(**SHAPES[shape], max_position_embeddings=128, eos_token_id=None,
                         bos_token_id=None)
    params = jax.jit(sj.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
    if cfg.tie_word_embeddings:
        params["embed"]["embedding"] = params["embed"]["embedding"] * 20
    else:
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 30
    return cfg, params


def recompute(cfg, params, tokens):
    """Full-sequence logits at every exit for prompt + generated tokens, as numpy."""
    out = sj.exit_logits(cfg, params, np.asarray([PROMPT + tokens]))
    return {e: np.asarray(v[0]) for e, v in out.items()}


@pytest.mark.parametrize("shape,seed", CASES)
def test_cached_greedy_equals_argmax_of_full_recomputation(shape, seed):
    cfg, params = model(shape, seed)
    for e in cfg.resolved_exits:
        toks = generate(cfg, params, PROMPT, N, exit_layer=e).tokens[0]
        ref = recompute(cfg, params, toks)[e]
        assert len(toks) == N
        np.testing.assert_array_equal(toks, ref[len(PROMPT) - 1:-1].argmax(-1), err_msg=f"exit {e}")
    if shape != "gqa":
        return
    # The step function itself, driven from the host: its logits match at every step.
    L, seq, ref = cfg.num_layers, PROMPT + toks, recompute(cfg, params, toks)[cfg.num_layers]
    cache = decode.prefill(cfg, params, jnp.asarray([PROMPT[:-1]]), jnp.zeros(1, jnp.int32), 64)
    for i in range(len(PROMPT) - 1, len(seq) - 1):
        logits, cache = decode.decode_step(cfg, params, cache, jnp.asarray([seq[i]]),
                                           jnp.zeros(1, jnp.int32), jnp.int32(i), jnp.int32(L),
                                           jnp.int32(0))
        np.testing.assert_allclose(logits[0], ref[i], atol=2e-4)


def test_batch_with_left_padding_equals_each_prompt_alone():
    cfg, params = model("gqa", 0)
    prompts = [PROMPT, [8]]  # a 1-token prompt alone has nothing to prefill
    batch = generate(cfg, params, prompts, N).tokens
    alone = [generate(cfg, params, p, N).tokens[0] for p in prompts]
    assert batch == alone
    as_array = generate(cfg, params, np.asarray([PROMPT, [1, 2, 3, 4, 5]]), N).tokens
    assert as_array[0] == alone[0]


@pytest.mark.parametrize("shape,seed", CASES)
def test_greedy_speculative_is_token_identical_to_plain_greedy(shape, seed):
    cfg, params = model(shape, seed)
    plain = generate(cfg, params, PROMPT, N).tokens
    for n in range(1, cfg.num_layers):
        for k in (1, 3, None) if shape == "gqa" else (2, 3):  # (2, 3): one verify size
            out = generate(cfg, params, PROMPT, N, draft_exit=n, draft_tokens=k)
            assert out.tokens == plain, (n, k)
            st = out.stats
            assert st["drafted"] == st["accepted"] + st["rejected"] > 0
            assert st["rejection_ratio"] == pytest.approx(st["rejected"] / st["drafted"])
    # stop tokens end both decodings at the same place (the stop token is kept)
    stop = plain[0][4]
    cut = plain[0][:plain[0].index(stop) + 1]
    assert generate(cfg, params, PROMPT, N, stop_tokens=[stop]).tokens == [cut]
    assert generate(cfg, params, PROMPT, N, draft_exit=1, stop_tokens=[stop]).tokens == [cut]


def test_on_device_speculation_equals_greedy_for_prompts_stops_and_exits():
    cfg, params = model("gqa", 1)
    for prompt in ([3], list(range(2, 14))):
        plain = generate(cfg, params, prompt, N).tokens[0]
        for stop in (None, plain[N // 2]):
            stops = [] if stop is None else [stop]
            want = generate(cfg, params, prompt, N, stop_tokens=stops).tokens
            for n in range(1, cfg.num_layers):
                got = generate(cfg, params, prompt, N, draft_exit=n, stop_tokens=stops)
                assert got.tokens == want, (prompt, stop, n)
                assert got.stats["rounds"] == len(got.stats["draft_lengths"]) >= 1
    one = generate(cfg, params, prompt, 1, draft_exit=2)
    assert one.tokens == [plain[:1]] and one.stats["draft_lengths"] == [1]


@pytest.mark.parametrize("k", [None, 2])
def test_host_driven_rounds_equal_the_device_loop(k):
    from soft_jax.infer.speculative import speculative_generate

    cfg, params = model("gqa", 0)
    s = decode.Decoding(N, stop_ids=(generate(cfg, params, PROMPT, N).tokens[0][6],))
    device = speculative_generate(cfg, params, PROMPT, 2, k, s)
    assert speculative_generate(cfg, params, PROMPT, 2, k, s, host_loop=True) == device


def test_speculation_loop_makes_no_host_transfer():
    # The whole generation is one device program: no device-to-host copy until it returns.
    cfg, params = model("gqa", 0)
    cache = decode.prefill(cfg, params, jnp.asarray([PROMPT[:-1]]), jnp.zeros(1, jnp.int32), 64)
    args = (jnp.int32(PROMPT[-1]), jnp.int32(len(PROMPT) - 1), jnp.int32(2), jnp.int32(0),
            jnp.int32(4))
    with jax.transfer_guard_device_to_host("disallow"):
        st = spec_loop(cfg, params, cache, *args, max_k=15, adaptive=True,
                       s=decode.Decoding(N))
        jax.block_until_ready(st)
    assert np.asarray(st.out[:N]).tolist() == generate(cfg, params, PROMPT, N).tokens[0]


def identity_last_layer(params):
    """The model with its last layer's residual updates zeroed: exit L-1 == exit L exactly."""
    params = jax.tree.map(lambda x: x, params)  # fresh containers, shared leaves
    for group, name in (("attn", "o_proj"), ("mlp", "down_proj")):
        kernel = params["layers"][group][name]["kernel"]
        params["layers"][group][name]["kernel"] = kernel.at[-1].set(0.0)
    return params


def test_adaptive_k_follows_the_paper_rule_when_the_draft_is_the_model():
    # Exit L-1 of a model whose last layer does nothing drafts exactly what the model says:
    # everything is accepted, so K grows 4, 6, 8, ... and the rejection ratio is 0.
    cfg, params = model("gqa", 0)
    params = identity_last_layer(params)
    out = generate(cfg, params, PROMPT, 2 * N, draft_exit=cfg.num_layers - 1)
    assert out.tokens[0][:N] == generate(cfg, params, PROMPT, N).tokens[0]
    assert out.stats["rejected"] == 0 and out.stats["rejection_ratio"] == 0
    assert out.stats["draft_lengths"] == [4, 6, 7]  # 5 + 7 tokens, then 8 more fill 2N


def test_dynamic_extreme_thresholds_equal_plain_greedy():
    cfg, params = model("gqa", 3)
    never = generate(cfg, params, PROMPT, N, thresholds=1.5)
    assert never.tokens == generate(cfg, params, PROMPT, N).tokens
    assert never.stats["mean_exit_layer"] == cfg.num_layers and never.stats["layer_skip_rate"] == 0
    first = cfg.resolved_exits[0]
    always = generate(cfg, params, PROMPT, N, thresholds=0.0)
    assert always.tokens == generate(cfg, params, PROMPT, N, exit_layer=first).tokens
    assert always.stats["mean_exit_layer"] == first
    assert always.stats["layer_skip_rate"] == pytest.approx(1 - first / cfg.num_layers)


def test_dynamic_lazy_catch_up_is_exact_and_calm_copy_is_not(monkeypatch):
    cfg, params = model("gqa", 0)
    thr = 0.5
    worst, runs = {}, {}
    # chunk 4 is the accelerator default (several pending rows per catch-up call)
    for variant, copy, chunk in (("lazy", False, 1), ("lazy4", False, 4), ("calm", True, 1)):
        monkeypatch.setattr(dynamic, "catchup_chunk", lambda c=chunk: c)
        out = generate(cfg, params, PROMPT, N, thresholds=thr, copy_kv=copy)
        toks, exits, confs = out.tokens[0], out.stats["exits"], out.stats["exit_confidences"]
        runs[variant] = (toks, exits)
        ref = recompute(cfg, params, toks)
        dev = 0.0
        for t, (tok, e, c) in enumerate(zip(toks, exits, confs)):
            pos = len(PROMPT) - 1 + t
            probs = {x: jax.nn.softmax(ref[x][pos]).max() for x in cfg.resolved_exits}
            dev = max(dev, abs(probs[e] - c))
            if not copy:  # the same exit a full recomputation picks, and its argmax
                assert tok == ref[e][pos].argmax()
                assert all(probs[x] < thr + 1e-5 for x in cfg.resolved_exits if x < e)
                assert e == cfg.num_layers or probs[e] >= thr - 1e-5
        worst[variant] = dev
        if not copy:
            assert len(set(exits)) >= 3 and out.stats["catchup_layer_passes"] > 0
    assert worst["lazy"] < 1e-5 and worst["lazy4"] < 1e-5, worst
    assert runs["lazy"] == runs["lazy4"]
    assert worst["calm"] > 1e-3, worst  # the check above would catch approximate KV


def test_sampling_is_reproducible_per_seed():
    cfg, params = model("gqa", 0)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(cfg, params, PROMPT, N, seed=1, **kw).tokens
    assert a == generate(cfg, params, PROMPT, N, seed=1, **kw).tokens
    assert a != generate(cfg, params, PROMPT, N, seed=2, **kw).tokens
    greedy = generate(cfg, params, PROMPT, N).tokens
    assert generate(cfg, params, PROMPT, N, temperature=0.7, top_k=1, seed=5).tokens == greedy
    # Speculative sampling with a draft equal to the model (q == p): reproducible, and every
    # draft is accepted, which holds only if each draft is tested at its own position.
    params = identity_last_layer(params)
    spec = dict(kw, draft_exit=cfg.num_layers - 1, draft_tokens=3)
    a = generate(cfg, params, PROMPT, N, seed=1, **spec)
    assert a.tokens == generate(cfg, params, PROMPT, N, seed=1, **spec).tokens
    assert a.tokens != generate(cfg, params, PROMPT, N, seed=2, **spec).tokens
    assert a.stats["rejected"] == 0 and a.stats["drafted"] >= N - 3
    # ... also with adaptive K, which then grows by 2 every round
    b = generate(cfg, params, PROMPT, 2 * N, seed=3, **dict(spec, draft_tokens=None))
    assert b.stats["rejected"] == 0 and b.stats["draft_lengths"] == [4, 6, 7]


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))

    def kept(**kw):
        return np.isfinite(decode.filter_logits(logits, decode.Decoding(1, 1.0, **kw)))[0]

    assert kept().tolist() == [True] * 4
    assert kept(top_k=2).tolist() == [False, True, False, True]
    assert kept(top_p=0.7).tolist() == [False, True, False, True]  # 0.5 < 0.7, then 0.8
    assert kept(top_p=0.85).tolist() == [False, True, True, True]
    assert kept(top_k=3, top_p=0.1).tolist() == [False, True, False, False]


def test_speculative_sampling_rule_reproduces_the_target_distribution():
    # Draft from q, accept/resample against p, many seeds: the first emitted token must follow
    # p (not q) and the first draft is accepted with probability sum_x min(p(x), q(x)).
    v, k, n = 6, 2, 40000
    rng = np.random.default_rng(0)
    p_logits = jnp.asarray(rng.normal(size=(k + 1, v)) * 1.5, jnp.float32)
    q_logits = jnp.asarray(rng.normal(size=(k, v)) * 1.5, jnp.float32)
    p0, q0 = jax.nn.softmax(p_logits[0]), jax.nn.softmax(q_logits[0])

    q = np.asarray(jax.nn.softmax(q_logits, axis=-1), np.float64)
    drafts = np.stack([(rng.random((n, 1)) > np.cumsum(q[i])[None]).sum(1) for i in range(k)], 1)
    accept = jax.jit(jax.vmap(partial(accept_drafts, k=jnp.int32(k), greedy=False),
                              in_axes=(0, 0, None, None)))
    u, drafts = jnp.asarray(rng.random((n, k + 1)), jnp.float32), jnp.asarray(drafts, jnp.int32)
    m, nxt = accept(u, drafts, q_logits, p_logits)
    first, accepted = np.where(m > 0, drafts[:, 0], nxt), np.asarray(m) > 0
    freq = np.bincount(np.asarray(first), minlength=v) / n
    np.testing.assert_allclose(freq, p0, atol=0.012)
    assert abs(float(np.mean(accepted)) - float(jnp.minimum(p0, q0).sum())) < 0.012
    assert np.abs(freq - np.asarray(q0)).max() > 0.05  # q and p really differ
    # q == p: every draft is accepted, and the bonus then follows p_k
    m, nxt = accept(u, drafts, p_logits[:k], p_logits)
    assert np.all(np.asarray(m) == k)
    np.testing.assert_allclose(np.bincount(nxt, minlength=v) / n, jax.nn.softmax(p_logits[k]),
                               atol=0.012)


def test_default_thresholds_map_the_paper_by_relative_depth():
    assert default_thresholds(sj.preset("llama2-13b")) == PAPER_THRESHOLDS
    tl = default_thresholds(sj.preset("tinyllama-1.1b"))  # exits 8..20 of 22 layers
    assert list(tl) == [8, 10, 12, 14, 16, 18, 20]
    assert tl[8] == 0.95 and tl[20] == 0.7 and list(tl.values()) == sorted(tl.values())[::-1]


def test_bad_arguments_raise_value_errors_naming_the_argument():
    cfg, params = model("gqa", 0)
    bad = [(dict(exit_layer=0), "exit_layer"), (dict(exit_layer=5), "exit_layer"),
           (dict(exit_layer=2.5), "exit_layer"), (dict(exit_layer=True), "exit_layer"),
           (dict(draft_exit=4), "draft_exit"), (dict(exit_layer=2, draft_exit=1), "draft_exit"),
           (dict(draft_exit=1, thresholds=0.5), "thresholds"), (dict(thresholds={4: 0.5}),
                                                                "thresholds"),
           (dict(draft_exit=1, draft_tokens=0), "draft_tokens"), (dict(top_p=0.0), "top_p")]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            generate(cfg, params, PROMPT, N, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(cfg, params, PROMPT, 0)
    with pytest.raises(ValueError, match="one prompt"):
        generate(cfg, params, [PROMPT, PROMPT], N, draft_exit=1)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(cfg, params, [[]], N)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(cfg, params, [3, cfg.vocab_size], N)
    with pytest.raises(ValueError, match="copy_kv"):
        generate(cfg, params, PROMPT, N, copy_kv=True)


def _save_word_tokenizer(folder, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


def hf_folder(tmp_path):
    """The gqa test model written as a Hugging Face folder (its config loads back equal, so the
    CLI reuses the compilations of the tests above)."""
    cfg, params = model("gqa", 0)
    sj.save_hf(cfg, params, tmp_path / "hf")
    assert sj.load_hf(tmp_path / "hf", exits=cfg.exits)[0] == cfg
    return tmp_path / "hf"


def test_cli_prompt_ids_without_tokenizer_and_text_with_one(tmp_path, capsys):
    folder, ids = hf_folder(tmp_path), ",".join(map(str, PROMPT))
    cfg, params = model("gqa", 0)
    expected = generate(cfg, params, PROMPT, N).tokens[0]
    args = ["--hf", str(folder), "--exits", "1,2,3", "--max-new-tokens", str(N)]
    assert main(args + ["--prompt-ids", ids]) == 0
    ids_line, stats_line = capsys.readouterr().out.strip().splitlines()
    assert ids_line == ",".join(map(str, expected))
    assert json.loads(stats_line)["tokens"] == expected and "tokens_per_s" in stats_line

    assert main(args + ["--prompt", "w5 w7", "--exit", "2"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    _save_word_tokenizer(folder, cfg.vocab_size)
    assert main(args + ["--prompt", " ".join(f"w{t}" for t in PROMPT)]) == 0
    text, stats_line = capsys.readouterr().out.strip().splitlines()
    assert json.loads(stats_line)["tokens"] == expected
    assert text.split() == [f"w{t}" for t in expected]
    assert main(args + ["--prompt-ids", "5", "--draft-exit", "4"]) == 2
    assert "draft_exit 4" in capsys.readouterr().err


def test_cli_mode_flags_reach_generate(tmp_path, capsys, monkeypatch):
    # The modes themselves are tested through the API above; here only the plumbing.
    folder = hf_folder(tmp_path)
    seen = {}

    def fake(config, params, ids, max_new, **kw):
        seen.update(kw, exits=config.resolved_exits, ids=ids)
        return Generation([[1, 2]], {"mean_exit_layer": 1.0, "exits": [1, 1]})

    monkeypatch.setattr(cli, "generate", fake)
    assert main(["--hf", str(folder), "--prompt-ids", "4,5", "--draft-exit", "1",
                 "--draft-tokens", "2", "--temperature", "0.5", "--top-k", "3", "--seed", "7"]) == 0
    assert seen["draft_exit"] == 1 and seen["draft_tokens"] == 2 and seen["top_k"] == 3
    assert seen["temperature"] == 0.5 and seen["seed"] == 7 and seen["ids"] == [4, 5]
    assert main(["--hf", str(folder), "--prompt-ids", "4", "--dynamic", "--exits", "1,2",
                 "--thresholds", "1:0.3,2:0.9", "--copy-kv"]) == 0
    assert seen["dynamic"] and seen["copy_kv"] and seen["thresholds"] == {1: 0.3, 2: 0.9}
    assert seen["exits"] == (1, 2, 4)
    out = capsys.readouterr().out
    assert '"mean_exit_layer": 1.0' in out and '"exits"' not in out
    assert main(["--hf", str(folder), "--prompt-ids", "4", "--thresholds", "1=0.3"]) == 2
    assert "--thresholds" in capsys.readouterr().err


def test_new_settings_reuse_the_compiled_loops():
    # Decoding's numbers are traced: other seeds, temperatures, top-k/p and max_new (within one
    # capacity bucket) run the same compiled plain, speculative and dynamic loops.
    cfg, params = model("gqa", 0)
    loops = (decode.decode_loop, spec_loop, dynamic.dynamic_loop)
    sampled = dict(temperature=0.9, top_k=5, top_p=0.8, seed=2)
    runs = [sampled, dict(sampled, draft_exit=2), dict(thresholds=0.5, seed=2)]
    for kw in runs:
        generate(cfg, params, PROMPT, N, **dict(kw, temperature=kw.get("temperature", 0) / 2,
                                                 seed=1))
    before = [f._cache_size() for f in loops]
    for kw in runs:
        generate(cfg, params, PROMPT, N + 3, **kw)
    assert [f._cache_size() for f in loops] == before


def weight_copies(hlo: str, layers) -> list[str]:
    """Instructions of a compiled program that produce an array shaped like a layer kernel
    (a copy or slice of weights), other than passing a parameter through."""
    shapes = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(layers) if x.ndim > 1}
    through = ("parameter", "get-tuple-element", "bitcast", "tuple")
    return [line.strip()[:120] for line in hlo.splitlines() if " = " in line
            and line.split(" = ")[1].split("{")[0].split(" ")[0] in shapes
            and not line.split(" = ")[1].split(" ")[1].startswith(through)]


def test_decode_reads_per_layer_weights_in_place_made_once():
    cfg, params = model("gqa", 0)
    split = decode.for_decoding(params)
    assert decode.for_decoding(params)["layers"] is split["layers"]  # made once per params
    assert decode.for_decoding(split) is split
    changed = identity_last_layer(params)  # one leaf differs: a new split, not a stale one
    assert decode.for_decoding(changed)["layers"] is not split["layers"]
    np.testing.assert_array_equal(decode.for_decoding(changed)["layers"][-1]["attn"]["o_proj"]
                                  ["kernel"], 0.0)
    kept = decode._SPLIT_CACHE[0][1]
    del changed
    import gc
    gc.collect()
    assert all(e[1] is not kept for e in decode._SPLIT_CACHE)  # freed with its params
    cache, last, pad, slot = decode.prefill_prompts(cfg, params, [PROMPT], N)
    args = (cache, last, pad, slot, jnp.int32(3), jnp.int32(0), decode.Decoding(N))
    in_place = decode.decode_loop.lower(cfg, split, *args).compile().as_text()
    assert weight_copies(in_place, split["layers"]) == []
    spec = spec_loop.lower(cfg, split, cache, last[0], slot, jnp.int32(2), jnp.int32(0),
                           jnp.int32(4), 15, True, decode.Decoding(N)).compile().as_text()
    assert weight_copies(spec, split["layers"]) == []
    # The same check sees the copies of a split made inside the program (the slow path).
    in_trace = decode.decode_loop.lower(cfg, params, *args).compile().as_text()
    assert weight_copies(in_trace, split["layers"])
    assert (np.asarray(decode.decode_loop(cfg, params, *args)[0]) ==
            np.asarray(decode.decode_loop(cfg, split, *decode.prefill_prompts(
                cfg, params, [PROMPT], N), jnp.int32(3), jnp.int32(0),
                decode.Decoding(N))[0])).all()
