"""Run by test_checkpoint in a fresh process: train, save at a step, or load and go on."""
from __future__ import annotations

import json
import sys

import torch

import hetmem
from hetmem.corpus import load_corpus, random_batch
from tests.engine.helpers import tiny_gpt


def main(mode: str, ckpt: str, dtype: str, steps: int, save_at: int, out: str, nvme_dir: str = "",
         chunk_size: str = "8192") -> None:
    model = tiny_gpt(seed=0, dropout=0.1)
    config = dict(device="cpu", device_budget="3MiB", dtype=dtype, chunk_size=int(chunk_size), gradient_clipping=0.5,
                  optimizer=dict(lr=1e-3, weight_decay=0.1))
    if nvme_dir:
        config.update(nvme_dir=nvme_dir, host_budget="900KiB")
    engine = hetmem.initialize(model, config)
    data = load_corpus()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1234)
    start = 0
    if mode == "resume":
        state = engine.load_checkpoint(ckpt)
        gen.set_state(state["generator"])
        start = state["step"]
    losses = {}
    for step in range(start + 1, steps + 1):
        x, y = random_batch(data, 4, 32, gen)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses[step] = loss.item()
        if mode == "train" and step == save_at:
            engine.save_checkpoint(ckpt, client_state={"generator": gen.get_state(), "step": step})
    with open(out, "w") as f:
        json.dump({"losses": losses, "state": {k: v.tolist() for k, v in engine.state_dict().items()
                                               if k == "ln_f.weight"}}, f)
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6],
         *sys.argv[7:9])
