"""Hugging Face transformers models work unchanged (GPT-2 and Llama built from a config)."""
from __future__ import annotations

import copy

import pytest
import torch

import hetmem
from tests.engine.helpers import batches, config

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


# budgets below activations + all parameters, so chunks are evicted every step
@pytest.mark.parametrize("make,budget", [(_gpt2, "2600KiB"), (_llama, "1650KiB")], ids=["gpt2", "llama"])
def test_hf_model_trains_like_plain_torch(make, budget):
    torch.manual_seed(0)
    ref = make()
    model = copy.deepcopy(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    engine = hetmem.initialize(model, config(device_budget=budget, chunk_size=4096))
    for x, _ in batches(5):
        expected = ref(input_ids=x, labels=x).loss
        expected.backward()
        opt.step()
        opt.zero_grad()
        out = engine(input_ids=x, labels=x)  # a ModelOutput, as without hetmem
        engine.backward(out.loss)
        engine.step()
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)
    state = engine.state_dict()
    expected_state = ref.state_dict()
    assert list(state) == list(expected_state)
    for key, value in expected_state.items():
        # GPT-2's key bias (part of c_attn.bias) has a zero gradient up to rounding noise, which
        # Adam turns into steps of +-lr, so ulp differences between Adam kernels show up there;
        # the losses above are the exact check.
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-4, msg=key)
    assert engine.scheduler.peak_total <= engine.budgets.device
    assert any(s["evictions"] for s in engine.recorder.steps if not s["warmup"])
