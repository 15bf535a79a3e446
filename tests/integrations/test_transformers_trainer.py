"""HetmemTrainer: the Hugging Face Trainer through hetmem gives the plain Trainer's losses while
chunks move every step, checkpoints into the Trainer's folders and resumes bit-exactly."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hetmem.integrations.transformers import HetmemTrainer, hetmem_config_for  # noqa: E402

BUDGET = "480KiB"   # below parameters (362 KiB) + activations (~280 KiB): chunks move every step
HETMEM = {"device": "cpu", "device_budget": BUDGET, "chunk_size": 4096}


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attention_dropout=0.0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, rows: int = 40, length: int = 16):
        self.rows = torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def training_args(out, **overrides) -> transformers.TrainingArguments:
    values = dict(output_dir=str(out), max_steps=20, per_device_train_batch_size=2, learning_rate=3e-3,
                  weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-7, lr_scheduler_type="linear",
                  warmup_steps=4, max_grad_norm=0.5, logging_steps=1, save_strategy="steps", save_steps=10,
                  save_total_limit=2, seed=0, report_to=[], use_cpu=True, disable_tqdm=True, optim="adamw_torch",
                  dataloader_num_workers=0)
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def logged(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    plain = transformers.Trainer(model=tiny_llama(), args=training_args(root / "plain"), train_dataset=Tokens())
    plain.train()
    hetmem_trainer = HetmemTrainer(hetmem_config=HETMEM, model=tiny_llama(), args=training_args(root / "hetmem"),
                                   train_dataset=Tokens())
    hetmem_trainer.train()
    yield root, plain, hetmem_trainer
    hetmem_trainer.engine.close()


def test_losses_equal_the_plain_trainer_while_chunks_move(runs):
    _, plain, trained = runs
    expected, got = logged(plain), logged(trained)
    assert [h["step"] for h in got] == list(range(1, 21))
    for want, have in zip(expected, got):
        assert relative(have["loss"], want["loss"]) <= 1e-5, (want, have)   # NaN fails
        assert have["learning_rate"] == want["learning_rate"]          # the same warm-up + linear schedule
        assert relative(have["grad_norm"], want["grad_norm"]) <= 1e-5, (want, have)  # clipped at 0.5 both
    steady = [s for s in trained.engine.recorder.steps if not s["warmup"]]
    assert len(steady) >= 15 and all(s["evictions"] and s["moves"] for s in steady)
    assert trained.engine.scheduler.peak_total <= trained.engine.budgets.device


def test_checkpoints_hold_the_engine_state_in_the_trainer_folders(runs):
    root, _, _ = runs
    folder = root / "hetmem" / "checkpoint-10"
    for name in ("model.safetensors", "scheduler.pt", "rng_state.pth", "trainer_state.json", "hetmem/latest"):
        assert (folder / name).is_file(), name
    assert not (folder / "optimizer.pt").exists()   # the moments are in hetmem/, chunk by chunk
    reloaded = transformers.LlamaForCausalLM.from_pretrained(root / "hetmem" / "checkpoint-20")
    weights = runs[2].engine.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)


def test_resume_from_step_10_continues_bit_exactly(runs, tmp_path):
    root, _, uninterrupted = runs
    resumed = HetmemTrainer(hetmem_config=HETMEM, model=tiny_llama(), args=training_args(tmp_path),
                            train_dataset=Tokens())
    resumed.train(resume_from_checkpoint=str(root / "hetmem" / "checkpoint-10"))
    want = [(h["step"], h["loss"], h["learning_rate"]) for h in logged(uninterrupted)]
    have = [(h["step"], h["loss"], h["learning_rate"]) for h in logged(resumed)]
    assert have == want   # steps 1-10 from the checkpoint's trainer state, 11-20 trained again: equal bits
    resumed.engine.close()


def test_training_arguments_decide_dtype_clipping_and_accumulation(tmp_path):
    config = hetmem_config_for(training_args(tmp_path, bf16=True, max_grad_norm=0.0, gradient_accumulation_steps=4),
                               {"device_budget": "1MiB"})
    assert (config.dtype, config.gradient_clipping, config.gradient_accumulation_steps) == ("bf16", None, 4)
    assert config.device == "cpu" and config.device_budget == 1 << 20
    assert hetmem_config_for(training_args(tmp_path), None).dtype == "fp32"
    with pytest.raises(ValueError, match=r"hetmem_config\['dtype'\]='bf16': with HetmemTrainer the "
                                         r"TrainingArguments decide it \(bf16 / fp16\)"):
        hetmem_config_for(training_args(tmp_path), {"dtype": "bf16"})
    with pytest.raises(ValueError, match=r"hetmem_config\['optimizer'\]"):
        hetmem_config_for(training_args(tmp_path), {"optimizer": {"lr": 1.0}})
    with pytest.raises(ValueError, match=r"hetmem_config\['device'\]='cuda' but the Trainer runs on cpu"):
        hetmem_config_for(training_args(tmp_path), {"device": "cuda"})


def test_lora_model_trains_like_the_plain_trainer(tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"]))

    args = dict(max_steps=6, save_strategy="no", max_grad_norm=1.0, warmup_steps=2)
    plain = transformers.Trainer(model=lora(), args=training_args(tmp_path / "plain", **args), train_dataset=Tokens())
    plain.train()
    trainer = HetmemTrainer(hetmem_config={**HETMEM, "device_budget": "400KiB"}, model=lora(),
                            args=training_args(tmp_path / "hetmem", **args), train_dataset=Tokens())
    trainer.train()
    for want, have in zip(logged(plain), logged(trainer), strict=True):
        assert relative(have["loss"], want["loss"]) <= 1e-5, (want, have)
    assert all(s["evictions"] for s in trainer.engine.recorder.steps if not s["warmup"])
    trainer.save_model(str(tmp_path / "adapter"))
    saved = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    trained = trainer.engine.state_dict()
    for key, value in peft.get_peft_model_state_dict(saved).items():
        full_key = next(k for k in trained if k.endswith(key.replace(".weight", ".default.weight")))
        torch.testing.assert_close(value, trained[full_key], rtol=0, atol=0, msg=key)
    trainer.engine.close()


def test_gradient_accumulation_matches_the_plain_trainer(tmp_path):
    args = dict(max_steps=6, gradient_accumulation_steps=2, save_strategy="no")
    plain = transformers.Trainer(model=tiny_llama(), args=training_args(tmp_path / "plain", **args),
                                 train_dataset=Tokens())
    plain.train()
    trainer = HetmemTrainer(hetmem_config=HETMEM, model=tiny_llama(), args=training_args(tmp_path / "hetmem", **args),
                            train_dataset=Tokens())
    trainer.train()
    assert trainer.engine.config.gradient_accumulation_steps == 2
    for want, have in zip(logged(plain), logged(trainer), strict=True):
        assert relative(have["loss"], want["loss"]) <= 1e-5, (want, have)
    trainer.engine.close()


def test_a_partial_accumulation_window_is_a_clear_error(tmp_path):
    trainer = HetmemTrainer(hetmem_config=HETMEM, model=tiny_llama(), train_dataset=Tokens(rows=6),
                            args=training_args(tmp_path, max_steps=4, gradient_accumulation_steps=2,
                                               save_strategy="no"))
    with pytest.raises(ValueError, match=r"this accumulation window has 1 of gradient_accumulation_steps=2 "
                                         r"batches \(the end of an epoch\)"):
        trainer.train()
    trainer.engine.close()


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Hugging Face Trainer", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Hugging Face Trainer)", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 20
    assert (tmp_path / "hf_run" / "checkpoint-20" / "hetmem" / "latest").is_file()
    assert (tmp_path / "hf_run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_and_fp16_follow_the_fp32_curve(runs, tmp_path, precision):
    _, _, fp32 = runs
    trainer = HetmemTrainer(hetmem_config=HETMEM, model=tiny_llama(), train_dataset=Tokens(),
                            args=training_args(tmp_path, save_strategy="no", **{precision: True}))
    trainer.train()
    assert trainer.engine.config.dtype == precision
    for want, have in zip(logged(fp32), logged(trainer), strict=True):
        assert relative(have["loss"], want["loss"]) <= 0.02, (want, have)
    trainer.engine.close()
