"""GGUF files of the Qwen2 and Qwen3 families (llama.cpp's tensor and tokenizer layout, written
here from a tiny random HF model with the `gguf` package) convert with `soft-jax convert
from-gguf` into a checkpoint whose exit logits equal the original model's, and keep their
tokenizer and chat template."""

import json

import numpy as np
import pytest

import soft_jax as sj
from conftest import CHATML, make_hf_model
from soft_jax.cli.main import main
from soft_jax.data.tokenizer import train_bpe
from test_hf_parity import rel_err, torch_exit_logits

pytest.importorskip("gguf")
FAMILIES = {"qwen2": dict(tie=True, heads=4, kv_heads=2),
            "qwen3": dict(heads=4, kv_heads=2, head_dim=32)}  # 4 x 32 != 64, and not 128


def write_gguf(model, tokenizer, path, arch: str) -> None:
    """A float32 GGUF of `model` in llama.cpp's layout (tensor names, metadata, BPE tokenizer)."""
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()),
                                     cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(CHATML)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")),
                     tensor.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_family_gguf_converts_exactly(tmp_path, arch):
    tok = train_bpe(["<|im_start|> user assistant <|im_end|> the cat sat on the mat 0123"] * 5, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})  # Qwen's, as in
    # every real Qwen GGUF (transformers' GGUF tokenizer adds it otherwise)
    _, model = make_hf_model(tmp_path, vocab=len(tok), hidden=64, inter=96, layers=3,
                             family=arch, bos_token_id=None, eos_token_id=tok.eos_token_id,
                             **FAMILIES[arch])
    gguf_file = tmp_path / f"tiny-{arch}.f32.gguf"
    write_gguf(model, tok, gguf_file, arch)
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "from-gguf", "--gguf", str(gguf_file), "--out", str(ckpt),
                 "--hf-out", str(tmp_path / "from_gguf")]) == 0
    config, params, tokenizer, _ = sj.load_model(ckpt)
    assert (config.qkv_bias, config.qk_norm) == (arch == "qwen2", arch == "qwen3")
    ids = np.array([[5, 17, 42, 99, 3, 250, 7, 64]])
    exits = (1, 2, 3)
    ours = sj.exit_logits(config, params, ids, exits=exits)
    want = torch_exit_logits(model, ids)
    for e in exits:  # float32 dequantisation is exact: only float32 reassociation differs
        assert rel_err(np.asarray(ours[e]), want[e]) < 1e-4, e
    text = "the cat sat on the mat"
    assert tokenizer.encode(text, add_special_tokens=False) == tok.encode(
        text, add_special_tokens=False)
    assert tokenizer.chat_template == CHATML
