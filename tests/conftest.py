"""Shared fixtures: offline HF, tiny random torch LLaMA models saved as HF folders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent XLA compilation cache for the run, inherited by the subprocess tests: the
# many processes (xdist workers, CLI and multi-process runs) compile the same small programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

import soft_jax  # noqa: E402,F401  decides jax's platforms before any test starts a backend


# family -> (transformers config class, model class)
# a ChatML chat template (Qwen's format), for tokenizers trained in tests
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
              "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def hf_class(family: str):
    """The transformers model class of a family."""
    import transformers

    return getattr(transformers, HF_CLASSES[family][1])


def make_hf_model(tmp_path, name="hf", *, vocab=101, hidden=48, inter=112, layers=5, heads=4,
                  kv_heads=2, tie=False, theta=10000.0, seed=0, dtype="float32", rope_scaling=None,
                  head_dim=None, family="llama", head_scale=1.0, **extra):
    """Save a tiny random transformers model of `family` (LlamaForCausalLM by default; `extra`
    config fields such as sliding_window); return (folder, torch model). `head_scale`
    sharpens the head so greedy decoding has no near-ties."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              tie_word_embeddings=tie, max_position_embeddings=256, rms_norm_eps=1e-5)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    rope = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling is not None:
        rope.update(rope_scaling)
    kw["rope_parameters"] = rope
    model = model_cls(config_cls(**kw, **extra)).eval()
    with torch.no_grad():  # non-trivial norms and biases so a bug in either cannot hide
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.get_output_embeddings().weight.mul_(head_scale)
    model = model.to(getattr(torch, dtype))
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def hf_model_factory(tmp_path):
    return lambda **kw: make_hf_model(tmp_path, **kw)
