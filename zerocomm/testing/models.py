"""Tiny models for tests, the demo and benchmarks.

They exercise the structures the partitioner must handle: tied embeddings, frozen
parameters, MoE experts, and the HF GPT-2 / Llama nesting (blocks one level down
inside `transformer` / `model`). Construction is deterministic for a given seed
and leaves the global RNG untouched, so every rank builds identical weights.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def is_expert_param(name: str, param: nn.Parameter | None = None) -> bool:
    """True for MoE expert parameters (they sync over the expert-data group)."""
    return ".experts." in name


class _LMMixin:
    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = cast(nn.Module, self)(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        # The key bias has an exactly-zero true gradient (softmax ignores a
        # per-query constant), so Adam turns its rounding noise into lr-sized
        # steps: equality tests against a reference use qkv_bias=False.
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * dim
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class TopOneMoE(nn.Module):
    """Top-1 mixture of experts. Every expert runs on every token and the output is
    masked, so each expert gets a (possibly zero) gradient each step: keeps grad
    hooks and tests deterministic at this tiny size."""

    def __init__(self, dim: int, n_experts: int):
        super().__init__()
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(dim, 2 * dim) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = F.softmax(self.router(x), dim=-1)
        top = gates.argmax(dim=-1, keepdim=True)
        weight = torch.zeros_like(gates).scatter(-1, top, gates.gather(-1, top))
        return sum(weight[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, n_heads: int, n_experts: int = 0, qkv_bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads, qkv_bias)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = TopOneMoE(dim, n_experts) if n_experts > 0 else MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(_LMMixin, nn.Module):
    is_expert_param = staticmethod(is_expert_param)

    def __init__(
        self,
        vocab: int = 64,
        dim: int = 32,
        n_layers: int = 4,
        n_heads: int = 4,
        seq: int = 16,
        tie_weights: bool = True,
        frozen: bool = False,
        n_experts: int = 0,
        seed: int = 0,
        qkv_bias: bool = True,
        init_std: float | None = None,
    ):
        super().__init__()
        self.seq = seq
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.wte = nn.Embedding(vocab, dim)
            self.wpe = nn.Embedding(seq, dim)
            self.blocks = nn.ModuleList(Block(dim, n_heads, n_experts, qkv_bias) for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)
            if init_std is not None:  # GPT-2 style init: logits start near uniform
                for m in self.modules():
                    if isinstance(m, (nn.Linear, nn.Embedding)):
                        nn.init.normal_(m.weight, std=init_std)
        if tie_weights:
            self.head.weight = self.wte.weight
        if frozen:  # e.g. fixed position embeddings: must stay out of the plan
            self.wpe.weight.requires_grad_(False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.seq:
            raise ValueError(f"sequence length {T} exceeds the model's seq={self.seq}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class _GPT2Body(nn.Module):
    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, seq: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.drop = nn.Dropout(0.0)  # parameter-free, like HF's: the partitioner must drop it
        self.h = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device)))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2Like(_LMMixin, nn.Module):
    """Mimics HF GPT2LMHeadModel nesting: transformer.{wte,wpe,drop,h.N,ln_f} + lm_head."""

    def __init__(
        self,
        vocab: int = 64,
        dim: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        seq: int = 16,
        tie_weights: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer = _GPT2Body(vocab, dim, n_layers, n_heads, seq)
            self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie_weights:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer(idx))


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim)
        self.self_attn = LlamaAttention(dim, n_heads)
        self.post_attention_layernorm = nn.RMSNorm(dim)
        self.mlp = LlamaMLP(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class _LlamaBody(nn.Module):
    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaDecoderLayer(dim, n_heads) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaLike(_LMMixin, nn.Module):
    """Mimics HF LlamaForCausalLM nesting: model.{embed_tokens,layers.N,norm} + lm_head (untied)."""

    def __init__(
        self,
        vocab: int = 64,
        dim: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        tie_weights: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _LlamaBody(vocab, dim, n_layers, n_heads)
            self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie_weights:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(idx))
