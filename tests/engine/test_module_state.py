"""The model is the model: engine.module.state_dict()/load_state_dict() and close() see the chunks."""
from __future__ import annotations

import pytest
import torch

import hetmem
from tests.engine.helpers import batches, config, pair, steady_steps, tiny_gpt, train_engine
from tests.engine.test_parity import TIGHT


def _not_resident(engine) -> list[str]:
    return [s.name for s in engine.layout.slots if s.param.numel() != s.numel]


# a model whose parameters outgrow the budget even between steps (batch 1: small activations)
WIDE = dict(bias=True, d_model=128, n_layer=2)
WIDE_BUDGET = {"fp32": "1MiB", "bf16": "640KiB"}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_module_state_dict_is_the_engine_state_dict_under_eviction(dtype):
    model = tiny_gpt(1, **WIDE)
    engine = hetmem.initialize(model, config(device_budget=WIDE_BUDGET[dtype], dtype=dtype))
    train_engine(engine, batches(4, seed=1, batch_size=1))
    assert all(s["evictions"] for s in steady_steps(engine))
    assert _not_resident(engine), "every parameter is resident: the test would not see placeholders"
    expected = engine.state_dict()
    got = model.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].device.type == "cpu", key
        assert torch.equal(got[key], value), key
    kept = model.state_dict(keep_vars=True)  # torch's meaning: the live Parameter objects
    assert all(kept[name] is p for name, p in model.named_parameters())
    assert torch.equal(model.blocks[0].state_dict()["attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])


def test_state_dict_gives_each_parameter_its_original_dtype():
    torch.manual_seed(0)
    model = tiny_gpt(2).to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    engine = hetmem.initialize(model, config(device_budget=TIGHT, dtype="bf16"))
    state = model.state_dict()
    for key, value in original.items():
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], value), key
    assert engine.state_dict()["wte.weight"].dtype == torch.float32  # engine.state_dict(): full precision


def test_module_load_state_dict_writes_into_the_chunks():
    model = tiny_gpt(3, **WIDE)
    engine = hetmem.initialize(model, config(device_budget=WIDE_BUDGET["bf16"], dtype="bf16"))
    train_engine(engine, batches(2, seed=2, batch_size=1))
    assert _not_resident(engine)
    state = engine.state_dict()
    changed = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(changed)
    assert not result.missing_keys and not result.unexpected_keys
    again = engine.state_dict()
    for key, value in changed.items():
        assert torch.equal(again[key], value), key  # the fp32 master holds the loaded values
    slot = engine.layout.by_name["wte.weight"]
    compute = engine.manager.payload_in_memory(slot.group.chunks[hetmem.ChunkKind.PARAM])
    assert torch.equal(compute.narrow(0, slot.offset, slot.numel).view(slot.shape), changed["wte.weight"].bfloat16())
    model.load_state_dict(state, assign=True)  # assign keeps the Parameter objects hetmem trains
    assert engine.layout.slots[0].param is model.wte.weight
    assert torch.equal(engine.state_dict()["wte.weight"], state["wte.weight"])
    with pytest.raises(RuntimeError, match="size mismatch for wpe.weight"):
        model.load_state_dict({**state, "wpe.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match='Missing key.*"ln_f.weight"'):
        model.load_state_dict({k: v for k, v in state.items() if k != "ln_f.weight"})
    assert model.load_state_dict({"wpe.weight": state["wpe.weight"] * 2}, strict=False).missing_keys
    assert torch.equal(engine.state_dict()["wpe.weight"], state["wpe.weight"] * 2)
    train_engine(engine, batches(1, seed=3, batch_size=1))  # the engine goes on training


def test_save_pretrained_from_pretrained_reproduces_engine_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    engine = hetmem.initialize(model, config(device_budget="900KiB", chunk_size=4096))
    for x, _ in batches(3, seed=4, batch_size=1):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    assert _not_resident(engine)
    state = model.state_dict()
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]  # tied: one tensor, two names
    model.save_pretrained(tmp_path)
    engine.eval()
    x = batches(1, seed=5)[0][0]
    with torch.no_grad():
        expected = engine(input_ids=x).logits
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_close_leaves_the_trained_weights_in_the_module(monkeypatch):
    model = tiny_gpt(5, **WIDE)
    engine = hetmem.initialize(model, config(device_budget=WIDE_BUDGET["bf16"], dtype="bf16"))
    data = batches(3, seed=6, batch_size=1)
    train_engine(engine, data[:2])
    assert _not_resident(engine)
    monkeypatch.setattr(hetmem.module_state, "available_host_bytes", lambda: 1000)
    with pytest.raises(RuntimeError, match="hetmem export"):
        engine.close()
    monkeypatch.undo()
    train_engine(engine, data[2:])  # still open and training
    expected = engine.state_dict()
    engine.eval()
    x, y = data[0]
    with torch.no_grad():
        expected_loss = engine(x.clone(), y.clone())
    engine.close()
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        loss = model(x, y)  # a plain module now, in fp32 (the engine ran bf16)
    assert abs(loss.item() - expected_loss.item()) < 0.02 * expected_loss.item()
    model.train()
    model(x, y).backward()  # and trains with plain torch
    assert model.wte.weight.grad is not None


def test_close_without_keeping_weights():
    _, model = pair(seed=6)
    engine = hetmem.initialize(model, config())
    engine.close(keep_weights=False)
    assert all(p.numel() == 0 for p in model.parameters())


def test_peft_adapter_state_dict_and_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    lora = peft.LoraConfig(r=32, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}  # frozen: stays as it is
    model = peft.get_peft_model(base, lora)
    engine = hetmem.initialize(model, config(device_budget="800KiB", chunk_size=4096))
    for x, _ in batches(3, seed=4, batch_size=1):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    assert any("lora" in name for name in _not_resident(engine))
    adapter = peft.get_peft_model_state_dict(model)
    expected = peft.get_peft_model_state_dict(model, state_dict=engine.state_dict())
    assert list(adapter) == list(expected) and any("lora_B" in k for k in adapter)
    for key, value in expected.items():
        assert torch.equal(adapter[key], value), key
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # trained (B starts at 0)
    model.save_pretrained(tmp_path)
    engine.eval()
    x = batches(1, seed=5)[0][0]
    with torch.no_grad():
        logits = engine(input_ids=x).logits
    fresh = transformers.LlamaForCausalLM(cfg)
    fresh.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, logits, rtol=1e-6, atol=1e-6)
