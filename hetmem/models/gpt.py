"""A small GPT (decoder-only transformer) as users write them: tied embeddings, pre-norm
blocks, causal attention, optional activation checkpointing.  Used by `hetmem train`, the
benchmarks and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256          # bytes
    block_size: int = 128          # context length
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    bias: bool = True              # biases in Linear/LayerNorm (no bias on the attention input:
                                   # a key bias has a zero gradient, pure rounding noise)
    tie_weights: bool = True       # the output head shares the token embedding
    checkpoint: bool = False       # recompute each block in backward (torch.utils.checkpoint)

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_head={self.n_head}")

    @property
    def parameters(self) -> int:
        """Parameter count (tied weights once)."""
        d, v, t, L = self.d_model, self.vocab_size, self.block_size, self.n_layer
        b = 1 if self.bias else 0
        block = (2 * d + 2 * d * b              # two LayerNorms (weight + bias)
                 + 3 * d * d                    # qkv (no bias)
                 + d * d + d * b                # attention projection
                 + 4 * d * d + 4 * d * b        # fc
                 + 4 * d * d + d * b)           # out
        head = 0 if self.tie_weights else v * d
        return v * d + t * d + L * block + d + d * b + head


def config_for_parameters(target: int, *, vocab_size: int = 256, block_size: int = 128,
                          n_head: int = 4) -> GPTConfig:
    """The deepest-reasonable GPT near ``target`` parameters (d_model multiple of 64, ~d/32 layers)."""
    best = None
    for d in range(64, 8193, 64):
        layers = max(1, round((target - vocab_size * d - block_size * d) / (12 * d * d + 13 * d)))
        if layers > max(2, d // 24):
            continue
        cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=layers,
                        n_head=n_head if d % n_head == 0 else 1, d_model=d)
        if best is None or abs(cfg.parameters - target) < abs(best.parameters - target):
            best = cfg
    return best


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        shape = (B, T, self.n_head, C // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.wte.weight
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self.init_weights)

    def init_weights(self, module: nn.Module) -> None:
        """GPT-2 style init; also the init_fn for a model built on the meta device."""
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.cfg.checkpoint and self.training else block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
