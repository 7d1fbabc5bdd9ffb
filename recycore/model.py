"""The 12L RecycledCore model, in the order of docs/SPEC.md §2.

x = rms(tok_emb[ids] + bigram(ids)); x = smear(x); x0 = x
encoder layers (push skips; layer 0's raw values become v0)
recycled core (modulate, re-run physical layers 3, 4)
decoder layers (pop skips)
logits = softcap(rms(x) @ tok_emb^T); loss = cross-entropy (one fused op with the kernels)

State-dict names follow the seed's, so its checkpoints and artifacts load here.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from recycore import ops
from recycore.banks import bank_shapes, layer_slots
from recycore.config import Config


# ---------------------------------------------------------------------------
# Embedding-side modules
# ---------------------------------------------------------------------------
class CastedLinear(nn.Linear):
    """nn.Linear with an fp32 master weight cast to the activation dtype. With
    `qat` on (late QAT, SPEC §3) the forward sees the weight int6-fake-quantised
    per row, with a straight-through gradient."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.qat = False

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        if self.qat and self.training:
            w = w + (fake_quantize_int6(self.weight).to(x.dtype) - w).detach()
        return F.linear(x, w)


@torch.no_grad()
def fake_quantize_int6(w: Tensor) -> Tensor:
    """Per-row int6 round trip: scale = max(row |w|_max / 31, 1/31), q in [-32, 31]."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / 31.0).clamp_min(1.0 / 31.0)[:, None]
    return torch.clamp(torch.round(w32 / scale), -32, 31) * scale


def bigram_hash(ids: Tensor, buckets: int) -> Tensor:
    """bucket[0] = B-1; bucket[t] = ((36313*h[t]) XOR (27191*h[t-1])) mod (B-1), in int32."""
    h = ids.to(torch.int32)
    mod = buckets - 1
    out = torch.empty_like(h)
    out[..., 0] = mod
    out[..., 1:] = torch.bitwise_xor(36313 * h[..., 1:], 27191 * h[..., :-1]) % mod
    return out.long()


class BigramHashEmbedding(nn.Module):
    def __init__(self, buckets: int, bigram_dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, bigram_dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(bigram_dim, model_dim)
        nn.init.zeros_(self.proj.weight)  # GPT._init_weights makes it orthogonal when both dims >= 64
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.proj(self.embed(bigram_hash(ids, self.buckets)))
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    """x[t] = (1-g) x[t] + g x[t-1] with g = sigmoid(gate) per dim; x[-1] = 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        x_prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        return (1 - g) * x + g * x_prev


class ValueEmbedding(nn.Module):
    """One shared table -> linear ve_dim -> kv_dim -> times a scalar."""

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, ve_dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(ve_dim, kv_dim)
        nn.init.zeros_(self.proj.weight)  # GPT._init_weights makes it orthogonal when both dims >= 64
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.proj(self.embed(ids))
        return h * self.scale.to(h.dtype)


class RecycleModulation(nn.Module):
    """Per-dim scale and bias before a recycled pass (identity at init)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.bias.to(x.dtype)


# ---------------------------------------------------------------------------
# Attention and block
# ---------------------------------------------------------------------------
def rotary_tables(seq_len: int, rope_dims: int, base: float, train_seq_len: int, device) -> tuple[Tensor, Tensor]:
    """cos/sin (T, rope_dims/2) in fp32 (empty for rope_dims = 0: no rotation). Past the table's train
    length the base is NTK-scaled: base * (T/train_len)^(rd/(rd-2))."""
    if rope_dims == 0:
        empty = torch.empty(seq_len, 0, device=device)
        return empty, empty
    if seq_len > train_seq_len:
        base = base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config, use_xsa: bool):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.use_xsa = use_xsa
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        if cfg.gated_attention:
            self.attn_gate = nn.Linear(cfg.model_dim, cfg.num_heads, bias=True)
            nn.init.zeros_(self.attn_gate.weight)
            nn.init.constant_(self.attn_gate.bias, 4.0)
        else:
            self.attn_gate = None
        if cfg.value_residual:
            self.vr_lambda = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x: Tensor, norm_scale: Tensor, q_w: Tensor, k_w: Tensor, v_w: Tensor, out_w: Tensor,
                out_scale: Tensor, v_embed: Tensor | None = None, v0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(out_scale * Attn(u), the values v it attended to: without v0, u's raw values), u = rms(x) * norm_scale."""
        B, T, _ = x.shape
        cfg = self.cfg
        # q, k, v = u W_q^T, u W_k^T, u W_v^T split into heads; q, k = rms(q), rms(k); partial RoPE on
        # the first rope_dims dims; q *= q_gain[h]; the head gate's logits u W_g^T + b_g;
        # v = v + v_embed, then the value residual v = lam_0 v0 + lam_1 v
        cos, sin = rotary_tables(T, cfg.rope_dims, cfg.rope_base, cfg.rope_train_seq_len, x.device)
        gate = self.attn_gate
        residual = (v0, self.vr_lambda) if cfg.value_residual and v0 is not None else None
        q, k, v, gate_logits = ops.attention_inputs(
            x, norm_scale, q_w, k_w, v_w, None if gate is None else gate.weight, None if gate is None else gate.bias,
            cos, sin, self.q_gain, self.num_heads, self.num_kv_heads, cfg.kernels, v_embed=v_embed,
            value_residual=residual)
        y = ops.gated_xsa_attention(q, k, v, gate_logits, self.use_xsa, cfg.kernels)
        return ops.scaled_linear(y.reshape(B, T, -1), out_w, out_scale, cfg.kernels), v


def layer_norm_scale(cfg: Config, layer_idx: int) -> float:
    return 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0


class Block(nn.Module):
    """x_in = mix0*x + mix1*x0; x = x_in + attn_scale*Attn(rms(x_in)*s);
    x = x + mlp_scale*MLP(rms(x)*s), s = 1/sqrt(layer+1)."""

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.attn = CausalSelfAttention(cfg, use_xsa=layer_idx in cfg.xsa_layers)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
        # a buffer, not a Python float: blocks then differ only in structure (XSA, VE, value residual),
        # so per-block compiles share 4 graphs instead of specialising on 12 constants
        self.register_buffer("ln_scale", torch.tensor(layer_norm_scale(cfg, layer_idx)), persistent=False)
        self.parallel_residual = layer_idx >= cfg.num_layers - cfg.parallel_residual_last_n

    def forward(self, x: Tensor, x0: Tensor, q_w, k_w, v_w, out_w, up_w, down_w,
                v_embed: Tensor | None = None, v0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        # attention and MLP norm their inputs themselves, rms(.) * ln_scale (fused: folded into their first
        # GEMMs' consumers); the scales multiply their outputs (fused: folded into their last weights)
        a, v = self.attn(x_in, self.ln_scale, q_w, k_w, v_w, out_w, self.attn_scale.to(x.dtype), v_embed=v_embed,
                         v0=v0)
        x = x_in + a
        x = x + ops.leaky_relu2_mlp(x_in if self.parallel_residual else x, up_w, down_w, self.cfg.kernels,
                                    out_scale=self.mlp_scale.to(x.dtype), norm_scale=self.ln_scale)
        return x, v


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------
class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        L, d = cfg.num_layers, cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.bigram = BigramHashEmbedding(cfg.bigram_vocab_size, cfg.bigram_dim, d) if cfg.bigram_vocab_size else None
        self.smear = SmearGate(d)
        self.num_encoder_layers = L // 2
        self.num_decoder_layers = L - L // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder_layers, self.num_decoder_layers), d))
        # Banks (recycore.banks): the attention and MLP matrices of all layers, fp32 masters for Muon.
        for name, shape in bank_shapes(L, d, cfg.kv_dim, cfg.mlp_dim).items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.ve_layers = list(cfg.ve_layers) if cfg.ve_enabled else []
        self.ve_shared = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, cfg.kv_dim) if self.ve_layers else None
        self.ve_layer_scales = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in self.ve_layers)
        self.recycle_mods = nn.ModuleList(
            RecycleModulation(d) for _ in range(len(cfg.recycle_layers) * cfg.recycle_repeats))
        self._init_weights()
        self._set_dtypes()

    @torch.no_grad()
    def _init_weights(self) -> None:
        L = self.cfg.num_layers
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)
        for i in range(L):
            nn.init.orthogonal_(self.qo_bank[i])
            nn.init.zeros_(self.qo_bank[L + i])
            nn.init.orthogonal_(self.kv_bank[i])
            nn.init.orthogonal_(self.kv_bank[L + i])
            nn.init.orthogonal_(self.mlp_up_bank[i])
            nn.init.zeros_(self.mlp_down_bank[i])
        # Every other 2-D linear with both dims >= 64 is orthogonal (this overrides the
        # zero init of the bigram/VE projections; the 8 x d head gate keeps zero).
        for module in self.modules():
            if isinstance(module, nn.Linear) and min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight)

    def _set_dtypes(self) -> None:
        """Embedding tables bf16; banks, projections, scalars and control tensors fp32."""
        self.float()
        tables = [self.tok_emb]
        if self.bigram is not None:
            tables.append(self.bigram.embed)
        if self.ve_shared is not None:
            tables.append(self.ve_shared.embed)
        for table in tables:
            table.to(torch.bfloat16)

    def set_qat(self, enabled: bool) -> None:
        """Late QAT: int6 fake quantisation of the linears outside the banks."""
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.qat = enabled

    def bank_weights(self, layer: int) -> tuple[Tensor, ...]:
        """(W_q, W_k, W_v, W_o, W_up, W_down) of physical layer `layer`."""
        return tuple(getattr(self, bank)[index] for bank, index in layer_slots(self.cfg.num_layers, layer))

    def value_embedding(self, layer: int, ids: Tensor, cache: dict) -> Tensor | None:
        if layer not in self.ve_layers:
            return None
        if "ve" not in cache:
            cache["ve"] = self.ve_shared(ids)
        return cache["ve"] * self.ve_layer_scales[self.ve_layers.index(layer)].to(cache["ve"].dtype)

    def hidden_states(self, ids: Tensor) -> Tensor:
        """The residual stream after the last block, before the final RMSNorm: (B, T, d)."""
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = ops.rms_norm(x)
        x = self.smear(x)
        x0, v0, skips, ve_cache = x, None, [], {}
        # Encoder: push skips; layer 0's values (raw: no v0 to blend with) feed the value residual.
        for i in range(self.num_encoder_layers):
            x, v = self.blocks[i](x, x0, *self.bank_weights(i), v_embed=self.value_embedding(i, ids, ve_cache), v0=v0)
            if v0 is None and self.cfg.value_residual:
                v0 = v
            skips.append(x)
        # Recycled core: the same physical blocks again, no VE, nothing pushed.
        mods = iter(self.recycle_mods)
        for _ in range(self.cfg.recycle_repeats):
            for layer in self.cfg.recycle_layers:
                x = next(mods)(x)
                x, _ = self.blocks[layer](x, x0, *self.bank_weights(layer), v0=v0)
        # Decoder: pop skips (LIFO).
        for i in range(self.num_decoder_layers):
            layer = self.num_encoder_layers + i
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x, _ = self.blocks[layer](x, x0, *self.bank_weights(layer),
                                      v_embed=self.value_embedding(layer, ids, ve_cache), v0=v0)
        return x

    def logits(self, x: Tensor) -> Tensor:
        """Soft-capped logits (B, T, vocab) of the residual stream x: cap * tanh(rms(x) @ tok_emb^T / cap)."""
        return ops.softcap_logits(x, self.tok_emb.weight, self.cfg.logit_softcap)

    def forward_logits(self, ids: Tensor) -> Tensor:
        return self.logits(self.hidden_states(ids))

    def loss(self, x: Tensor, targets: Tensor) -> Tensor:
        """Mean token cross-entropy (fp32) of the soft-capped logits of the residual stream x."""
        return ops.softcap_cross_entropy(x, self.tok_emb.weight, targets, self.cfg.logit_softcap)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        return self.loss(self.hidden_states(ids), targets)

    def choose_kernels(self, batch_seqs: int, seq_len: int, *, training: bool) -> None:
        """One eager forward on random tokens of this batch shape, so that each fused kernel family with
        several implementations measures them on the shapes and layouts this model passes, before
        torch.compile traces the model (a trace cannot time anything); the choices are cached. training:
        the forward runs with autograd, so the choices are by forward+backward time, else by forward time."""
        weight = self.tok_emb.weight
        if not ops.fused(self.cfg.kernels, weight):
            return
        ids = torch.randint(0, self.cfg.vocab_size, (batch_seqs, seq_len), device=weight.device)
        with torch.set_grad_enabled(training), torch.autocast(weight.device.type, dtype=torch.bfloat16):
            self.forward_logits(ids)
