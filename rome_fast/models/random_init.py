"""Randomly initialised models of each family, from a config and a seed: tiny ones for tests and
real-sized ones (GPT-2 XL, GPT-J, Llama-7B shapes) for GPU timing, where the cost of a forward pass
does not depend on the weights' values and no hub is reachable. Their tokenizer is a byte-level
BPE trained on the fly on a built-in text, so nothing is downloaded."""
from __future__ import annotations

import functools

import torch

_CORPUS = """\
The Eiffel Tower is located in the city of Paris. The Space Needle is in the city of Seattle.
Danielle Darrieux was a French actress; the mother tongue of Danielle Darrieux is French.
Vinson Massif is located in the continent of Antarctica. Michael Jordan plays the sport of basketball.
The Colosseum is in Rome, the capital of Italy. Toyota is headquartered in Japan. Apple was founded
by Steve Jobs. The official language of Brazil is Portuguese. Miles Davis plays the trumpet.
Berlin is the capital of Germany, and Madrid is the capital of Spain. Lionel Messi plays football.
The Louvre is a museum in Paris. Mount Everest is in Nepal. The Nile flows through Egypt.
"""

# Shapes of real models (GPU timing) and tiny ones (tests): layers, hidden, heads, intermediate.
SHAPES = {
    "tiny": dict(n_layer=4, d=64, heads=4, inner=256, vocab=None),
    "gpt2-xl": dict(n_layer=48, d=1600, heads=25, inner=6400, vocab=50257),
    "gpt2-medium": dict(n_layer=24, d=1024, heads=16, inner=4096, vocab=50257),
    "gpt-j-6b": dict(n_layer=28, d=4096, heads=16, inner=16384, vocab=50400),
    "llama-7b": dict(n_layer=32, d=4096, heads=32, inner=11008, vocab=32000),
}


@functools.lru_cache(maxsize=4)
def random_texts(n: int = 300, seed: int = 0, words: tuple[int, int] = (10, 60)) -> list[str]:
    """n seeded texts of words drawn from the tiny tokenizer's corpus (a statistics corpus for the
    tiny models)."""
    import random
    vocab = _CORPUS.split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(*words))) for _ in range(n)]


def tiny_tokenizer(vocab_size: int = 400):
    """A GPT-2-style byte-level BPE (no BOS, leading-space tokens) trained on a built-in text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_CORPUS] * 4, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    # no token_type_ids, as GPT-2's own tokenizer (older transformers would return them, and GPT-2
    # adds their embeddings)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  model_input_names=["input_ids", "attention_mask"])
    tok.pad_token = tok.eos_token
    return tok


def random_config(family: str, size: str = "tiny", n_layer: int | None = None):
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    s = dict(SHAPES[size])
    if n_layer is not None:
        s["n_layer"] = n_layer
    vocab = s["vocab"] or len(tiny_tokenizer())
    eos = tiny_tokenizer().eos_token_id
    common = dict(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos)
    if family == "gpt2":
        return GPT2Config(n_layer=s["n_layer"], n_embd=s["d"], n_head=s["heads"], n_inner=s["inner"],
                          n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          vocab_size=vocab, bos_token_id=eos, eos_token_id=eos)
    if family == "gptj":
        return GPTJConfig(n_layer=s["n_layer"], n_embd=s["d"], n_head=s["heads"], n_inner=s["inner"],
                          rotary_dim=max(8, s["d"] // s["heads"] // 2), n_positions=2048,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=s["n_layer"], hidden_size=s["d"],
                             num_attention_heads=s["heads"], intermediate_size=s["inner"],
                             rotary_pct=0.25, max_position_embeddings=2048, **common)
    llama_like = dict(num_hidden_layers=s["n_layer"], hidden_size=s["d"], num_attention_heads=s["heads"],
                      num_key_value_heads=max(1, s["heads"] // 2) if size == "tiny" else s["heads"],
                      intermediate_size=s["inner"], max_position_embeddings=2048, **common)
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "mistral":
        return MistralConfig(sliding_window=4096, **llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    raise ValueError(f"no random config for family {family!r}")


RANDOM_FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2")


ATTENTION = ("eager", "sdpa")


def random_model(family: str, size: str = "tiny", seed: int = 0, dtype=torch.float32, device="cpu",
                 n_layer: int | None = None, attn: str | None = None):
    """(model, tokenizer) with seeded random weights, in eval mode. attn: the attention
    implementation, "eager" or "sdpa" (default: eager for tiny models, sdpa for real sizes)."""
    from transformers import AutoModelForCausalLM

    attn = attn or ("eager" if size == "tiny" else "sdpa")
    if attn not in ATTENTION:
        raise ValueError(f"attn must be one of {ATTENTION}, not {attn!r}")
    config = random_config(family, size, n_layer)
    tok = tiny_tokenizer() if size == "tiny" else _sized_tokenizer()
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if size == "tiny":
        _randomise_tiny_(model, seed)
    model.eval().requires_grad_(False)
    return model, tok


@torch.no_grad()
def _randomise_tiny_(model, seed: int) -> None:
    """Weights large enough that a tiny model's predictions depend strongly on the input (tests of
    restoration then see real, distinguishable effects), and norm gains and biases away from 1
    and 0, so that a test notices a norm or bias applied in the wrong place (say, one block's two
    norms swapped, or a projection's bias dropped). The 1-D draws come from their own generator:
    the matrices are those of a seed whatever the 1-D parameters are."""
    g = torch.Generator().manual_seed(seed)
    g1 = torch.Generator().manual_seed(seed + 7919)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g1) * 0.1)
        else:  # a norm's gain
            p.copy_(1 + torch.randn(p.shape, generator=g1) * 0.2)


def _sized_tokenizer():
    """For real-sized random models only the token ids matter; the tiny tokenizer's ids are all
    valid for their larger vocabularies."""
    return tiny_tokenizer()
