"""Llama 3, Mistral, Qwen2 and Qwen3 through the whole journey, one parametrised test over
tiny random models of each transformers class: per-exit logits, loss, a SoFT step, both
conversions and sub-model export, greedy / self-speculative / dynamic decoding against HF.

Tolerances: exit logits 1e-4 relative (float32 matmul reassociation between XLA and torch,
a few layers deep); losses 1e-5 relative (a mean of float32 log-softmaxes). Decoding is
compared token for token: the heads are sharpened (`head_scale`) so argmax has no near-ties.
"""

import numpy as np
import pytest
import torch

import jax
import soft_jax as sj
from conftest import hf_class
from soft_jax.io.families import ConversionError
from soft_jax.io.hf import config_from_hf
from soft_jax.model.transformer import exit_hidden_states
from test_hf_parity import rel_err, torch_exit_logits

WINDOW = 6  # Mistral's sliding window here: every sequence below is longer
FAMILIES = {
    "llama3": dict(family="llama", tie=True, theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "mistral": dict(family="mistral", sliding_window=WINDOW, head_dim=16),
    "qwen2": dict(family="qwen2", tie=True, theta=1000000.0),
    "qwen3": dict(family="qwen3", head_dim=16, theta=1000000.0),  # 4 heads x 16 != 48
}
PROMPT, N = [5, 7, 9, 11, 3, 8, 2, 4], 12


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_through_the_whole_journey(hf_model_factory, tmp_path, name):
    folder, model = hf_model_factory(layers=4, head_scale=30.0, bos_token_id=None,
                                     eos_token_id=None, **FAMILIES[name])
    family = FAMILIES[name]["family"]
    config, params = sj.load_hf(folder, exits=(2, 3))
    assert config.family == family
    assert config.sliding_window == FAMILIES[name].get("sliding_window")
    L = config.num_layers
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (2, 20))  # > WINDOW
    # exit logits == lm_head(norm(hidden_states[n])) at every layer
    ref, ours = torch_exit_logits(model, ids), sj.exit_logits(config, params, ids,
                                                              exits=tuple(range(1, L + 1)))
    errs = {n: rel_err(ours[n], ref[n]) for n in range(1, L + 1)}
    print(name, {n: f"{float(np.abs(ours[n] - ref[n]).max()):.1e} / {e:.1e}"
                 for n, e in errs.items()})
    assert max(errs.values()) < 1e-4, errs
    if config.sliding_window:  # the window is really exercised: without it logits differ
        unwindowed = sj.exit_logits(config.replace(sliding_window=None), params, ids)
        assert rel_err(unwindowed[L], ref[L]) > 1e-3
    # the multi-exit loss is the mean of torch's cross entropies
    targets = rng.integers(0, config.vocab_size, (2, 20))
    batch = {"input_ids": ids, "targets": targets, "loss_mask": np.ones((2, 20), np.int32)}
    loss, metrics = sj.exit_loss(config, params, batch)
    ces = [torch.nn.functional.cross_entropy(torch.tensor(ref[n]).reshape(-1, config.vocab_size),
                                             torch.tensor(targets).reshape(-1)).item()
           for n in (2, 3, L)]
    np.testing.assert_allclose(float(loss), np.mean(ces), rtol=1e-5)
    # a SoFT step trains every param, the family's biases and q/k norms included
    grads = jax.grad(lambda p: sj.exit_loss(config, p, batch)[0])(params)
    assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    assert float(sj.exit_loss(config, stepped, batch)[0]) < float(loss)
    # packed rows: each segment sees only itself (with the window inside it)
    seg = np.asarray([[1] * 9 + [2] * 11])
    pos = np.asarray([list(range(9)) + list(range(11))])
    packed = exit_hidden_states(config, params, ids[:1], pos, seg)
    alone = [exit_hidden_states(config, params, ids[:1, :9]),
             exit_hidden_states(config, params, ids[:1, 9:])]
    np.testing.assert_allclose(packed, np.concatenate(alone, axis=2), rtol=1e-5, atol=1e-5)
    # its own transformers class reloads the export with no missing / unexpected keys
    cls = hf_class(family)
    back, info = cls.from_pretrained(sj.save_hf(config, params, tmp_path / "back"),
                                     output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(ids)).logits.numpy(),
                                      model(torch.tensor(ids)).logits.numpy())
    sub, info = cls.from_pretrained(sj.save_hf(config, params, tmp_path / "exit2", exit_layer=2),
                                    output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        assert rel_err(ours[2], sub(torch.tensor(ids)).logits.numpy()) < 1e-4
    # decoding past the window: greedy == HF generate, speculation lossless, dynamic exact
    plain = sj.generate(config, params, PROMPT, N).tokens[0]
    assert plain == hf_greedy(model, PROMPT, N)
    assert sj.generate(config, params, PROMPT, N, exit_layer=2).tokens[0] == hf_greedy(
        sub, PROMPT, N)
    for draft in (1, 2):
        assert sj.generate(config, params, PROMPT, N, draft_exit=draft).tokens[0] == plain
    assert sj.generate(config, params, PROMPT, N, thresholds=1.5).tokens[0] == plain
    out = sj.generate(config, params, PROMPT, N, thresholds=0.5)
    toks, exits = out.tokens[0], out.stats["exits"]
    full = sj.exit_logits(config, params, np.asarray([PROMPT + toks]))
    for t, (tok, e) in enumerate(zip(toks, exits)):
        assert tok == int(np.argmax(full[e][0, len(PROMPT) - 1 + t])), (t, e)


@pytest.mark.parametrize("hf,match", [
    (dict(model_type="gemma", architectures=["GemmaForCausalLM"]), "Gemma-style norms"),
    (dict(model_type="mixtral", architectures=["MixtralForCausalLM"]), "mixture-of-experts"),
    (dict(model_type="qwen3_moe"), "mixture-of-experts"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "unsupported rope type 'yarn'"),
    (dict(sliding_window=4096), "sliding_window=4096 is set but LlamaForCausalLM ignores it"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
          sliding_window=8, max_window_layers=2), "mixes sliding and full attention"),
    (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=True),
     "attention_bias=True is not supported"),
])
def test_unsupported_options_are_refused_by_name(hf, match):
    base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=11,
                hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2)
    with pytest.raises(ConversionError, match=match) as e:
        config_from_hf({**base, **hf})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["llama3.2-1b", "llama3.1-8b", "mistral-7b", "qwen2.5-0.5b",
                                  "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b"])
def test_presets_plan_and_shard(name):
    from soft_jax.model.config import preset
    from soft_jax.model.transformer import param_axes
    from soft_jax.train.memory import plan

    config = preset(name, remat_policy="save_dots")
    exits = config.resolved_exits
    assert exits[0] / config.num_layers == pytest.approx(0.3, abs=0.02)
    assert all(b - a <= config.num_layers * 0.1 + 1 for a, b in zip(exits, exits[1:]))
    axes = param_axes(config)  # every option's params carry logical axes
    assert ("attn.q_proj.bias" in "".join(axes)) == config.qkv_bias
    assert ("attn.q_norm.scale" in "".join(axes)) == config.qk_norm
    p = plan(config, {"fsdp": 8, "tensor": 2}, 16, 2048)
    assert p.items["params"] > 0
    if config.qk_norm:  # the pre-norm q/k tags are planned for
        plain = plan(config.replace(qk_norm=False), {"fsdp": 8, "tensor": 2}, 16, 2048)
        assert p.items["layers"] > plain.items["layers"]
