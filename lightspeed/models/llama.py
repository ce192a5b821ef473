"""Llama / Qwen2 / Mistral forward pass over a paged KV cache.

The model computes a FLAT batch: the new tokens of every sequence in the step, concatenated
(prefill chunks and decodes mixed). Each layer writes the new K/V into the cache slots given by
`slot_mapping`, then attends over each sequence's whole context (cached + new tokens).
Sequences are split into at most three attention groups per step. A leading run of single-token
(decode) sequences needs no query padding. On CPU (fp32/bf16) it runs the paged kernel of
models/paged_attention.py, which reads K/V in place through the block tables: no gather, no mask;
otherwise (GPUs, other dtypes, no C compiler) it gathers the blocks and calls SDPA with the query
heads sharing a KV head folded into the query-row axis, so GQA costs no K/V copy. A trailing run
of fresh prompts (position 0) attends causally over its own new K/V straight on the projection
output, one SDPA call per run of equal-length prompts: no gather, no mask, no padding. Whatever
lies between (chunks continuing a prompt, prompts after a cached prefix) gathers its context
through the block tables and runs one SDPA call with queries padded to the longest chunk, using
SDPA's own GQA support so the causal mask is not repeated per head. Per layer there is no
per-sequence Python work except a call per fresh prompt whose length differs from its
neighbour's.

On CPU the rotary embedding, the KV-cache write, the weightless RMSNorm and silu(gate) * up run
as fused C kernels (models/fused_ops.py) from the same library as the paged kernel.

KV cache per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightspeed.models.attention_metadata import (
    AttentionGroup,
    AttentionMetadata,
    CacheLayout,
)
from lightspeed.models.fused_ops import FusedOps
from lightspeed.models.linear_ops import AtenOps, OneDnnOps, select_linear_ops
from lightspeed.models.paged_attention import (
    PagedDecodeAttention,
    advise_huge_pages,
    load_kernel,
)
from lightspeed.models.panel_gemm import PanelGemm, PanelOps
from lightspeed.models.prefill_attention import PrefillAttention
from lightspeed.models.weights import ModelConfig, RopeScaling, StateDict

PANEL_GEMM_ENV = "LIGHTSPEED_PANEL_GEMM"  # "0": fp32 linears on oneDNN (A/B benchmarks)


def select_model_ops(
    device: torch.device,
    dtype: torch.dtype,
    kernel: PagedDecodeAttention | None,
    weight_dtype: torch.dtype | None = None,
) -> AtenOps:
    """The linear backend: fp32 on CPU with the C kernel library takes the panel GEMM (its
    non-panel weights keep oneDNN, so oneDNN must work too), storing weights in `weight_dtype`
    (fp32 or bf16; default fp32), else select_linear_ops (weights in `dtype`)."""
    ops = select_linear_ops(device, dtype)
    use_panels = os.environ.get(PANEL_GEMM_ENV, "1") != "0"
    if use_panels and kernel is not None and dtype == torch.float32 and isinstance(ops, OneDnnOps):
        return PanelOps(PanelGemm(kernel.lib), weight_dtype or torch.float32)
    return ops


# ---------------------------------------------------------------- rotary embedding


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv if config.rope_scaling is None else _scale_inv_freq(inv, config.rope_scaling)


def _scale_inv_freq(inv: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / scaling.low_freq_factor, inv / scaling.factor, inv)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old_len / scaling.high_freq_factor) & (wavelen <= old_len / scaling.low_freq_factor)
    return torch.where(medium, blended, scaled)


class RotaryTable:
    """Per position: cos duplicated over both halves, and sin negated on the first half, so
    rotary is x * cos + roll(x, d/2) * sin (4 kernels instead of rotate_half's 8); and for the
    fused kernel, float32 cos/sin of each frequency once ([positions, d/2], `cos_half`).
    Grown on demand, looked up once per step."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self._inv_freq = rope_inv_freq(config)
        self._dtype = dtype
        self._device = device
        self.cos = torch.empty(0, config.head_dim, dtype=dtype, device=device)
        self.sin = self.cos
        self.cos_half = self.sin_half = torch.empty(0, config.head_dim // 2)
        self.ensure(config.max_position_embeddings)

    def ensure(self, num_positions: int) -> None:
        if num_positions <= self.cos.shape[0]:
            return
        size = max(num_positions, 2 * self.cos.shape[0])  # amortize growth past the config
        freqs = torch.outer(torch.arange(size, dtype=torch.float32), self._inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        self.cos_half, self.sin_half = cos.contiguous(), sin.contiguous()
        self.cos = torch.cat((cos, cos), dim=-1).to(self._device, self._dtype)
        self.sin = torch.cat((-sin, sin), dim=-1).to(self._device, self._dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, head_dim] each, broadcasting over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF `rotate_half` rotary on [T, heads, head_dim] (first half pairs with second half):
    [x1 * c - x2 * s, x2 * c + x1 * s] with `cos`/`sin` as laid out by RotaryTable."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


# ---------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One layer's weights as its linear backend wants them.

    Unfused (aten): norms keep their weights and gate/up are one matmul. Fused (oneDNN): each
    RMSNorm weight is folded into the columns of the matmul that reads the norm's output
    (W @ (w * x) = (W * w) @ x), so the norm is a bare rescale. Gate and up stay one matmul
    followed by the C silu * up (fused_ops.py) where that kernel exists (at 2,048 rows ~15%
    faster than the epilogues), else they are separate matmuls so each carries its own epilogue
    (SiLU; times the gate). Panel GEMM (fp32, models/panel_gemm.py): gate and up packed
    interleaved as `glu`, one matmul whose epilogue is silu(gate) * up.
    """

    input_norm: torch.Tensor | None  # None: folded into qkv
    qkv: torch.Tensor  # [q + 2 * kv, hidden]: q, k, v projections fused into one matmul
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor | None  # None: folded into gate and up
    gate_up: torch.Tensor | None  # [2 * ffn, hidden]: gate then up, fused (unfused backend)
    down: torch.Tensor
    gate: torch.Tensor | None = None  # fused backend
    up: torch.Tensor | None = None
    glu: torch.Tensor | None = None  # panel backend: gate and up interleaved


class PagedLlama:
    """Llama-family causal LM. Plain tensors (no nn.Module): inference only, nothing to train."""

    def __init__(
        self,
        config: ModelConfig,
        state: StateDict,
        dtype: torch.dtype,
        device: torch.device,
        weight_dtype: torch.dtype | None = None,
    ) -> None:
        """`weight_dtype`: how linear weights are stored where the backend can keep them apart
        from the compute `dtype` (bf16 panels for an fp32 model); `weight_dtype` reports what
        was done."""
        self.config = config
        self.dtype = dtype
        self.device = device
        self.paged_kernel = self._paged_kernel()
        self.ops: AtenOps = select_model_ops(device, dtype, self.paged_kernel, weight_dtype)
        self.weight_dtype = self.ops.weight_dtype if isinstance(self.ops, PanelOps) else dtype
        self.embed = self._get(state, "model.embed_tokens.weight")
        tied = state["lm_head.weight"] is state["model.embed_tokens.weight"]
        # A packed lm_head is a copy even when tied: the embedding lookup needs the plain rows.
        self.lm_head = self.ops.pack(self.embed if tied else self._get(state, "lm_head.weight"))
        self.norm = self._get(state, "model.norm.weight")
        # Rotary + KV write, the weightless norm and silu * up in one C pass each
        # (models/fused_ops.py); known before the layers: it decides how gate/up are packed.
        self.fused_ops = None if self.paged_kernel is None else FusedOps(self.paged_kernel.lib)
        self.prefill_kernel = self._prefill_kernel()
        self.layers = [self._layer(state, i) for i in range(config.num_layers)]
        self.rotary = RotaryTable(config, dtype, device)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def _paged_kernel(self) -> PagedDecodeAttention | None:
        cfg = self.config
        if not PagedDecodeAttention.supports(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device):
            return None
        return load_kernel()

    def _prefill_kernel(self) -> PrefillAttention | None:
        """The C causal attention for fresh prompts (fp32 / bf16 on CPU; SDPA otherwise)."""
        cfg = self.config
        if self.paged_kernel is None or not PrefillAttention.supports(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.dtype
        ):
            return None
        return PrefillAttention(self.paged_kernel.lib)

    def _get(self, state: StateDict, name: str, scale: torch.Tensor | None = None) -> torch.Tensor:
        """A weight on the device in the compute dtype; `scale` multiplies its columns first
        (in float32, so folding a norm weight adds no extra rounding)."""
        t = state[name]
        if scale is not None:
            t = t.float() * scale.float()
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def _layer(self, state: StateDict, i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        pack, fused = self.ops.pack, self.ops.fused
        in_norm = state[p + "input_layernorm.weight"]
        post_norm = state[p + "post_attention_layernorm.weight"]
        fold_in, fold_post = (in_norm, post_norm) if fused else (None, None)
        qkv = torch.cat([self._get(state, attn + f"{x}_proj.weight", fold_in) for x in "qkv"])
        bias = None
        if self.config.attention_bias:
            bias = torch.cat([self._get(state, attn + f"{x}_proj.bias") for x in "qkv"])
        gate = self._get(state, p + "mlp.gate_proj.weight", fold_post)
        up = self._get(state, p + "mlp.up_proj.weight", fold_post)
        o_proj, down = (
            pack(self._get(state, attn + "o_proj.weight")),
            pack(self._get(state, p + "mlp.down_proj.weight")),
        )
        if isinstance(self.ops, PanelOps):  # one matmul, silu(gate) * up as its epilogue
            return LayerWeights(None, pack(qkv), bias, o_proj, None, None, down, glu=self.ops.pack_glu(gate, up))
        if fused and self.fused_ops is not None:  # one wide matmul, then the C silu * up
            return LayerWeights(None, pack(qkv), bias, o_proj, None, pack(torch.cat([gate, up])), down)
        if fused:
            return LayerWeights(None, pack(qkv), bias, o_proj, None, None, down, pack(gate), pack(up))
        return LayerWeights(
            self._get(state, p + "input_layernorm.weight"),
            qkv,
            bias,
            o_proj,
            self._get(state, p + "post_attention_layernorm.weight"),
            torch.cat([gate, up]),
            down,
        )

    def cache_layout(self, num_blocks: int, block_size: int) -> CacheLayout:
        return CacheLayout(num_blocks, block_size, self.dtype, paged_decode=self.paged_kernel is not None)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        shape = (2, num_blocks, block_size, self.config.num_kv_heads, self.config.head_dim)
        caches = []
        for _ in range(self.config.num_layers):
            cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            advise_huge_pages(cache)  # before the zero fill touches the pages
            caches.append(cache.zero_())
        return caches

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[torch.Tensor],
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 logits [len(logits_indices) or T, vocab] for the flat batch `input_ids`."""
        if self.fused_ops is not None:  # the C kernels index with these: check them once
            self.fused_ops.check_indices(meta.positions, meta.slot_mapping, self.rotary.cos_half, kv_caches[0])
            cos = sin = self.rotary.cos_half  # unused: the kernel reads the fp32 tables
        else:
            cos, sin = self.rotary.lookup(meta.positions)
        hidden = F.embedding(input_ids, self.embed)  # the residual stream
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            hidden = self._layer_forward(layer, hidden, cos, sin, cache, meta)
        if logits_indices is not None:
            hidden = hidden.index_select(0, logits_indices)
        hidden = F.rms_norm(hidden, self.norm.shape, self.norm, self.config.rms_norm_eps)
        return self.ops.linear(hidden, self.lm_head).float()

    __call__ = forward

    def _layer_forward(
        self,
        w: LayerWeights,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        ops = self.ops
        qkv = ops.linear(self._rms_norm(hidden, w.input_norm), w.qkv, w.qkv_bias)
        q, k, v = self._rotate_and_cache(qkv, cos, sin, cache, meta)
        attn = self._attention(q, k, v, cache, meta)
        hidden = ops.linear_add(attn, w.o_proj, hidden)
        act = self._mlp_activation(w, self._rms_norm(hidden, w.post_norm))
        return ops.linear_add(act, w.down, hidden)

    def _mlp_activation(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """silu(x @ gate.T) * (x @ up.T)"""
        ops = self.ops
        if w.glu is not None:
            assert isinstance(ops, PanelOps)
            return ops.linear_glu(x, w.glu)
        if w.gate_up is None:  # oneDNN epilogues: SiLU on the gate GEMM, * gate on the up GEMM
            assert w.gate is not None and w.up is not None
            return ops.linear_mul(x, w.up, ops.linear_silu(x, w.gate))
        gate_up = ops.linear(x, w.gate_up)
        if self.fused_ops is not None:
            return self.fused_ops.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _rotate_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary on q and k, the new k and v written into their cache slots; returns q, k, v
        as [T, heads, dim] views (q and k rotated)."""
        cfg = self.config
        tokens = qkv.shape[0]
        qk = qkv[:, : cfg.q_size + cfg.kv_size].view(tokens, -1, cfg.head_dim)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(tokens, cfg.num_kv_heads, cfg.head_dim)
        if self.fused_ops is not None:  # in place in qkv, plus the cache write: one pass
            self.fused_ops.rope_write_kv(
                qkv, meta.positions, self.rotary.cos_half, self.rotary.sin_half, cache, meta.slot_mapping, cfg.num_heads
            )
        else:  # rotate q and k together: they are adjacent heads in the fused projection
            qk = apply_rope(qk, cos, sin)
            flat = cache.view(2, -1, cfg.num_kv_heads, cfg.head_dim)
            flat[0].index_copy_(0, meta.slot_mapping, qk[:, cfg.num_heads :])
            flat[1].index_copy_(0, meta.slot_mapping, v)
        return qk[:, : cfg.num_heads], qk[:, cfg.num_heads :], v

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        if weight is not None:
            return F.rms_norm(x, weight.shape, weight, eps)
        if self.fused_ops is not None:
            return self.fused_ops.rms_norm(x, eps)
        # Weight folded into the next matmul: one float32-accumulating reduction straight off
        # the bf16 input, then one rescale (F.rms_norm in bf16 makes ~8 passes over x).
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_()
        return x * torch.rsqrt(sq.div_(x.shape[-1]).add_(eps)).to(x.dtype)

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Attend per group (the new K/V are already in the cache). Returns [T, heads * dim]."""
        outs = []
        for g in meta.groups:
            span = slice(g.token_start, g.token_end)
            outs.append(
                self._group_attention(q[span], cache, g)
                if g.fresh_runs is None
                else self._fresh_attention(q[span], k[span], v[span], g.fresh_runs)
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _fresh_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: tuple[tuple[int, int, int], ...]
    ) -> torch.Tensor:
        """Causal attention on the fresh prompts' own q/k/v (strided views of the projection): no
        cache gather, no mask, no padding. On CPU: one C kernel call for all prompts
        (models/prefill_attention.py). Else SDPA, one batched call per run of adjacent
        equal-length prompts (8 x 256 tokens: ~7% faster a prefill step than a call per prompt)."""
        if self.prefill_kernel is not None:
            lengths = [(hi - lo) // count for lo, hi, count in runs for _ in range(count)]
            return self.prefill_kernel(q, k, v, lengths, self.scale)
        outs = []
        for lo, hi, count in runs:
            outs.append(self._causal_sdpa(q[lo:hi], k[lo:hi], v[lo:hi], count))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _causal_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> torch.Tensor:
        """`batch` prompts of one length, tokens [T, heads, dim] -> [B, heads, T / B, dim]."""
        qb, kb, vb = (x.view(batch, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=self.scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape[0], self.config.q_size)

    def _group_attention(self, q: torch.Tensor, cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        cfg = self.config
        batch, max_q = group.num_seqs, group.max_query_len
        kvh, dim = cfg.num_kv_heads, cfg.head_dim
        if group.block_tables is not None:
            assert self.paged_kernel is not None and group.context_lens is not None
            return self.paged_kernel(q, cache, group.block_tables, group.context_lens, self.scale)
        assert group.kv_index is not None
        kv = cache.view(-1, *cache.shape[2:]).index_select(0, group.kv_index)
        kv = kv.view(2, batch, -1, kvh, dim).transpose(2, 3)  # [2, B, kv_heads, ctx, dim]
        if max_q == 1:  # decode: the query heads of one KV head become that head's query rows
            queries = q.reshape(batch, kvh, cfg.num_heads // kvh, dim)
            out = F.scaled_dot_product_attention(queries, kv[0], kv[1], attn_mask=group.attn_mask, scale=self.scale)
            return out.reshape(batch, cfg.q_size)
        padded = q if group.pad_index is None else q.index_select(0, group.pad_index)
        queries = padded.view(batch, max_q, cfg.num_heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries,
            kv[0],
            kv[1],
            attn_mask=group.attn_mask,
            is_causal=group.attn_mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        out = out.transpose(1, 2).reshape(batch * max_q, cfg.q_size)
        return out if group.unpad_index is None else out.index_select(0, group.unpad_index)
