"""Generation with the KV cache: token-for-token equal to transformers' `generate`."""

import pytest
import torch

from neoray.model import GPTNeoX, KVCache, NeoXConfig
from neoray.model.generate import SamplingConfig, generate


def padding_ids(model):
    """Vocab padding ids: ours never emits them, so transformers is told to suppress them too."""
    return list(range(model.config.vocab_size, model.config.padded_vocab_size)) or None


def test_greedy_matches_transformers_generate(pair):
    ours, theirs = pair
    prompt = torch.randint(2, ours.config.vocab_size, (1, 9))
    expected = theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        suppress_tokens=padding_ids(ours),
    )[0, 9:].tolist()
    assert generate(ours, prompt.tolist(), SamplingConfig(max_new_tokens=32)) == [expected]


def test_left_padded_batch_matches_transformers(pair):
    ours, theirs = pair
    prompts = [torch.randint(2, ours.config.vocab_size, (n,)).tolist() for n in (7, 3, 5)]
    width = 7
    ids = torch.zeros(3, width, dtype=torch.long)
    attention = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        attention[row, width - len(p) :] = 1
    expected = theirs.generate(
        ids,
        attention_mask=attention,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        suppress_tokens=padding_ids(ours),
    )[:, width:].tolist()
    assert generate(ours, prompts, SamplingConfig(max_new_tokens=16)) == expected


def test_cached_decoding_equals_full_forward():
    torch.manual_seed(4)
    model = GPTNeoX(
        NeoXConfig(vocab_size=200, num_layers=2, hidden_size=32, num_heads=4, max_seq_len=40)
    ).eval()
    idx = torch.randint(0, 200, (2, 30))
    cache = KVCache(model.config, 2, 30, torch.float32, "cpu")
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :10], cache=cache), model(idx[:, 10:17], cache=cache)]
        pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(17, 30)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(5)
    return GPTNeoX(
        NeoXConfig(vocab_size=100, num_layers=1, hidden_size=32, num_heads=2, max_seq_len=64)
    ).eval()


def test_stops_at_eos_and_stop_sequences(small_model):
    prompt = [[5, 6, 7]]
    free = generate(small_model, prompt, SamplingConfig(max_new_tokens=12))[0]
    at_eos = generate(small_model, prompt, SamplingConfig(max_new_tokens=12, eos_token_id=free[4]))[
        0
    ]
    assert at_eos == free[: free.index(free[4])]
    stop = free[6:8]
    stopped = generate(small_model, prompt, SamplingConfig(max_new_tokens=12, stop=[stop]))[0]
    first = next(i for i in range(len(free) - 1) if free[i : i + 2] == stop)
    assert stopped == free[:first]


def test_sampling_is_seeded_and_filters(small_model):
    prompt = [[1, 2, 3], [4, 5]]
    sampled = SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    assert generate(small_model, prompt, sampled) == generate(small_model, prompt, sampled)
    top1 = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=1)
    assert generate(small_model, prompt, top1) == generate(
        small_model, prompt, SamplingConfig(max_new_tokens=10)
    )
    nucleus = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=2)
    assert generate(small_model, prompt, nucleus) == generate(
        small_model, prompt, SamplingConfig(max_new_tokens=10)
    )


def test_never_emits_vocab_padding(small_model):
    with torch.no_grad():
        small_model.embed_out.weight[100:] = 100.0  # make the padding rows win every argmax
    try:
        tokens = generate(small_model, [[1, 2]], SamplingConfig(max_new_tokens=5))[0]
    finally:
        torch.nn.init.zeros_(small_model.embed_out.weight[100:])
    assert max(tokens) < 100


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p")],
)
def test_bad_sampling_config(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**fields)


def test_too_long_request_is_refused(small_model):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(small_model, [[1] * 60], SamplingConfig(max_new_tokens=10))
