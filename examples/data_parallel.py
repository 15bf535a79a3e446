"""Data-parallel training with hetmem: run it with

    torchrun --standalone --nproc-per-node 2 examples/data_parallel.py

The only line data parallelism adds to a single-process hetmem script is the process group.
"""
import torch
import torch.distributed as dist

import hetmem
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig

dist.init_process_group("gloo")       # "nccl" on GPUs (then also torch.cuda.set_device(local rank))
rank, world = dist.get_rank(), dist.get_world_size()

model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, d_model=64))
engine = hetmem.initialize(model, dict(device="cpu", device_budget="4MiB", dtype="fp32", optimizer=dict(lr=1e-3)))

data = load_corpus()
generator = torch.Generator().manual_seed(0)    # every rank draws the same batch of 8 ...
for step in range(5):
    x, y = random_batch(data, 8, 32, generator)
    x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]   # ... and trains on its share
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()

weights = engine.state_dict()                   # the full weights, on every rank
if rank == 0:
    print(f"trained {step + 1} steps on {world} ranks; rank 0's last loss {loss.item():.3f}; "
          f"{len(weights)} tensors in engine.state_dict()")
engine.close()
dist.destroy_process_group()
