import math

import pytest
import torch

from recycore import ops
from recycore.kernels.attention import xsa_gate_reference
from recycore.config import Config
from recycore.model import GPT, bigram_hash, rotary_tables

TINY = dict(vocab_size=256, num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, ve_layers=(4, 5),
            recycle_layers=(1, 2), xsa_last_n=2, rope_dims=8, bigram_vocab_size=128, bigram_dim=32, ve_dim=32)


def tiny_model(**changes):
    torch.manual_seed(0)
    return GPT(Config(**{**TINY, **changes}))


def test_default_parameter_count_is_pinned():
    model = GPT(Config())
    count = sum(p.numel() for p in model.parameters())
    print(f"default config parameters: {count:,}")
    assert count == 29_406_940


def test_parameter_dtypes():
    model = tiny_model()
    bf16 = {name for name, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert bf16 == {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if name not in bf16)


def test_state_dict_names_are_the_seeds():
    keys = set(tiny_model().state_dict())
    for name in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "skip_weights", "smear.gate",
                 "bigram.embed.weight", "bigram.proj.weight", "bigram.scale", "ve_shared.embed.weight",
                 "ve_shared.proj.weight", "ve_shared.scale", "ve_layer_scales.0", "recycle_mods.1.bias",
                 "blocks.0.attn.q_gain", "blocks.0.attn.attn_gate.weight", "blocks.0.attn.attn_gate.bias",
                 "blocks.0.attn.vr_lambda", "blocks.0.resid_mix", "blocks.0.attn_scale", "blocks.0.mlp_scale"):
        assert name in keys, name


def test_initialisation():
    model = tiny_model()
    L = model.cfg.num_layers
    eye = torch.eye(64)
    assert torch.allclose(model.qo_bank[0] @ model.qo_bank[0].T, eye, atol=1e-5)  # W_q orthogonal
    assert not model.qo_bank[L:].any() and not model.mlp_down_bank.any()  # W_o, W_down zero
    assert not model.bigram.proj.weight.any()  # 64 x 32: below the orthogonal-init rule, stays zero
    proj = tiny_model(bigram_dim=64).bigram.proj.weight  # both dims >= 64: orthogonal overrides zero
    assert torch.allclose(proj.T @ proj, torch.eye(64), atol=1e-5)
    assert not model.bigram.embed.weight.float().any()
    gate = model.blocks[0].attn.attn_gate
    assert not gate.weight.any() and torch.all(gate.bias == 4.0)
    assert abs(model.tok_emb.weight.float().std().item() - 0.005) < 0.0005


def test_gate_starts_at_sigmoid_4():
    attn = tiny_model().blocks[0].attn
    u = torch.randn(2, 5, 64)
    gate = torch.sigmoid(ops.linear(u, attn.attn_gate.weight, attn.attn_gate.bias))
    assert torch.allclose(gate, torch.full_like(gate, 1 / (1 + math.exp(-4.0))))


def test_causality():
    model = tiny_model()
    with torch.no_grad():  # make every layer contribute (zero-init projections would hide leaks)
        for p in (model.qo_bank, model.mlp_down_bank):
            p.normal_(0, 0.05)
    ids = torch.randint(0, 256, (2, 33))
    changed = ids.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    a, b = model.forward_logits(ids), model.forward_logits(changed)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.equal(a[:, 20:], b[:, 20:])


def test_recycled_layers_run_twice_with_shared_weights():
    model = tiny_model()
    calls = {i: [] for i in range(6)}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: calls[i].append(args[2].data_ptr()))
    model(torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 9)))
    assert [len(calls[i]) for i in range(6)] == [1, 2, 2, 1, 1, 1]
    assert calls[1][0] == calls[1][1]  # the same W_q storage on both passes
    assert len(model.recycle_mods) == 2


def test_xsa_output_is_orthogonal_to_the_value_direction():
    y, v = torch.randn(2, 7, 4, 16, dtype=torch.float64), torch.randn(2, 7, 2, 16, dtype=torch.float64)
    out = xsa_gate_reference(y, v, None, xsa=True)
    n = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)
    assert (out * n).sum(-1).abs().max() < 1e-12
    assert (out - y).norm() > 0.1  # and it did change something


def test_xsa_layers_and_rotary_base():
    model = tiny_model()
    assert [b.attn.use_xsa for b in model.blocks] == [False] * 4 + [True] * 2
    cos, sin = rotary_tables(2048, 16, 10000.0, 1024, "cpu")
    base = 10000.0 * 2 ** (8 / 7)  # NTK: base * (T/1024)^(16/14)
    inv = 1.0 / base ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.allclose(cos[1].double(), torch.cos(inv), atol=1e-6)
    cos_short, _ = rotary_tables(1024, 16, 10000.0, 1024, "cpu")
    assert torch.allclose(cos_short[1].double(), torch.cos(1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)).double(),
                          atol=1e-6)


def test_bigram_hash():
    ids = torch.tensor([[5, 7, 1000]])
    h = bigram_hash(ids, 2048)
    assert h.tolist() == [[2047, (36313 * 7 ^ 27191 * 5) % 2047, (36313 * 1000 ^ 27191 * 7) % 2047]]


def test_loss_and_gradients_are_finite_under_autocast():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, torch.roll(ids, -1, 1))
    loss.backward()
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(256)) < 1.0
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert no_grad == ["blocks.0.attn.vr_lambda"]  # layer 0 has no v0 to blend with
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("changes", [dict(parallel_residual_last_n=2), dict(value_residual=False, ve_enabled=False,
                                                                            gated_attention=False, bigram_vocab_size=0,
                                                                            recycle_repeats=0, rope_dims=0)])
def test_options(changes):
    model = tiny_model(**changes)
    ids = torch.randint(0, 256, (2, 9))
    assert model.forward_logits(ids).shape == (2, 9, 256)
