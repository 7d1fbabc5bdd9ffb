"""recycore.quant: int5 packing layout, quantisers, classification, state-dict round trips."""
import pytest
import torch

from recycore import quant
from recycore.config import Config
from recycore.model import GPT
from recycore.errors import ArtifactError
from recycore.int5_codec import pack_int5, unpack_int5
from recycore.quant import quantize_int5, quantize_int8

# Big enough that attention (384x384, 192x384) and MLP (1152x384) matrices go int5
# and the embedding (512x384) int8; still only a few million parameters.
QUANT_CFG = Config(num_layers=4, model_dim=384, num_heads=4, num_kv_heads=2, mlp_mult=3.0, ve_layers=(2, 3),
                   recycle_layers=(1,), xsa_last_n=2, rope_dims=8, bigram_vocab_size=64, vocab_size=512)


def trained_like_state_dict(cfg=QUANT_CFG, seed=0):
    """A model state dict whose zero-initialised matrices (O, down, bigram) hold small
    random values, as after some training."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        L = cfg.num_layers
        model.qo_bank[L:].normal_(std=0.004)
        model.mlp_down_bank.normal_(std=0.003)
        model.bigram.embed.weight.normal_(std=0.01)
        model.tok_emb.weight.normal_(std=0.02)
    return model.state_dict()


# ---------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("values, expected", [
    # codes 0..7: the 40-bit word sum(j << 5j), hand-split into 5 little-endian bytes
    (list(range(-15, -7)), [0b00100000, 0b10001000, 0b01000001, 0b10001010, 0b00111001]),
    ([15] * 8, [0xDE, 0x7B, 0xEF, 0xBD, 0xF7]),  # code 30 = 11110 eight times
    ([0], [15, 0, 0, 0, 0]),                     # code 15, tail padded with zero bits
    ([15, -15, 1], [30, 64, 0, 0, 0]),           # 30 | 0<<5 | 16<<10 -> byte 1 bit 6
    ([-15] * 8 + [14], [0, 0, 0, 0, 0, 29, 0, 0, 0, 0]),
])
def test_pack_int5_layout(values, expected):
    packed = pack_int5(torch.tensor(values, dtype=torch.int8))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected
    assert unpack_int5(packed, (len(values),)).tolist() == values


@pytest.mark.parametrize("length", [1, 7, 8, 9, 31, 33, 1001])
def test_pack_unpack_round_trip_every_value(length):
    g = torch.Generator().manual_seed(length)
    values = torch.randint(-15, 16, (length,), generator=g, dtype=torch.int8)
    values[: min(length, 31)] = torch.arange(-15, 16, dtype=torch.int8)[: min(length, 31)]
    packed = pack_int5(values)
    assert packed.numel() == -(-length // 8) * 5
    assert torch.equal(unpack_int5(packed, (length,)), values)


def test_pack_unpack_matrix_row_major():
    q = torch.randint(-15, 16, (13, 7), dtype=torch.int8)
    packed = pack_int5(q)
    assert torch.equal(packed, pack_int5(q.flatten()))
    assert torch.equal(unpack_int5(packed, (13, 7)), q)


def test_pack_rejects_out_of_range_and_unpack_rejects_bad_data():
    with pytest.raises(ValueError, match=r"\[-15, 15\]"):
        pack_int5(torch.tensor([16], dtype=torch.int8))
    with pytest.raises(ArtifactError, match="must be 5 uint8 bytes"):
        unpack_int5(torch.zeros(4, dtype=torch.uint8), (3,))
    with pytest.raises(ArtifactError, match="code 31"):
        unpack_int5(torch.tensor([31, 0, 0, 0, 0], dtype=torch.uint8), (1,))


# ---------------------------------------------------------------------------
# Quantisers
# ---------------------------------------------------------------------------
def _row_errors(t, q, scale):
    return (t.float() - q.float() * scale.float()[:, None]).pow(2).sum(dim=1)


def test_seed_int5_picks_the_lowest_error_clip():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 4096, generator=g)
    t[:, :3] *= 40.0  # a few outliers per row: clipping them beats the row max
    q, scale = quantize_int5(t, "seed")
    errors = {}
    for p in quant.INT5_CLIP_QUANTILES:
        clip = torch.quantile(t.abs(), p, dim=1) if p < 1 else t.abs().amax(dim=1)
        s = (clip / 15).clamp_min(1 / 15).half()
        errors[p] = _row_errors(t, torch.clamp(torch.round(t / s.float()[:, None]), -15, 15), s).mean().item()
    best = min(errors, key=errors.get)
    assert best < 1.0, errors
    assert _row_errors(t, q, scale).mean().item() == pytest.approx(errors[best], rel=1e-6)
    assert scale.dtype == torch.float16 and q.dtype == torch.int8 and q.abs().max() <= 15


def test_seed_int5_scale_floor_zeroes_small_rows_and_rowmse_keeps_them():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(32, 512, generator=g) * 0.005  # all |w| < 1/30: the seed rounds every value to 0
    q_seed, s_seed = quantize_int5(t, "seed")
    assert (q_seed == 0).all() and torch.all(s_seed.float() == torch.tensor(1 / 15).half().float())
    q_mse, s_mse = quantize_int5(t, "rowmse")
    rel = (_row_errors(t, q_mse, s_mse).sum() / t.pow(2).sum()).item()
    assert rel < 0.01, rel


def test_rowmse_int5_is_per_row_best_of_its_candidates_and_beats_seed():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(48, 700, generator=g) * torch.logspace(-3, 0, 48)[:, None]
    t[::5, 0] *= 30.0
    q, scale = quantize_int5(t, "rowmse")
    chosen = _row_errors(t, q, scale)
    for clip in quant._rowmse_clip_candidates(t, quant.INT5_CLIP_QUANTILES):
        s = (clip / 15).clamp_min(quant.ROWMSE_MIN_SCALE).half()
        alt = _row_errors(t, torch.clamp(torch.round(t / s.float()[:, None]), -15, 15), s)
        assert torch.all(chosen <= alt * (1 + 1e-6))
    q_seed, s_seed = quantize_int5(t, "seed")
    assert torch.all(chosen <= _row_errors(t, q_seed, s_seed) * (1 + 1e-6))


def test_rowfloor_keeps_the_seeds_floor_and_never_loses_to_seed_per_row():
    g = torch.Generator().manual_seed(6)
    t = torch.randn(64, 1000, generator=g) * torch.logspace(-2, 0.5, 64)[:, None]
    t[::3, :2] *= 20.0
    q_seed, s_seed = quantize_int5(t, "seed")
    q, s = quantize_int5(t, "rowfloor")
    assert torch.all(s.float() >= torch.tensor(1 / 15).half().float())
    seed_err, err = _row_errors(t, q_seed, s_seed), _row_errors(t, q, s)
    assert torch.all(err <= seed_err) and err.sum() < seed_err.sum()


def test_int8_seed_clips_floors_and_stores_fp16_scales():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(40, 900, generator=g) * 0.3
    t[0] *= 0.001  # a small row: the 1/127 floor applies
    q, scale = quantize_int8(t, "seed")
    clip = torch.quantile(t.abs(), 99.99984 / 100, dim=1)
    expected_scale = torch.maximum(clip / 127, torch.tensor(1 / 127))
    assert scale.dtype == torch.float16 and q.dtype == torch.int8
    assert torch.equal(scale, expected_scale.half())
    clipped = torch.maximum(torch.minimum(t, clip[:, None]), -clip[:, None])
    assert torch.equal(q, torch.round(clipped / expected_scale[:, None]).clamp(-127, 127).to(torch.int8))
    q_mse, s_mse = quantize_int8(t, "rowmse")
    # (per row the seed can win by a hair: its floor is a scale no rowmse candidate hits exactly)
    assert _row_errors(t, q_mse, s_mse).sum() <= _row_errors(t, q, scale).sum()
    assert _row_errors(t, q_mse, s_mse)[0] < 0.01 * _row_errors(t, q, scale)[0]


def test_non_matrix_tensors_get_one_scale():
    t = torch.randn(4, 5, 6)
    q, s = quantize_int5(t, "seed")
    assert s.ndim == 0 and q.shape == t.shape
    q8, s8 = quantize_int8(t, "seed")
    assert s8.ndim == 0 and s8.dtype == torch.float32 and q8.shape == t.shape


def test_unknown_scheme_is_a_clear_error():
    for bad in ("gptq9", "rowfloor:x", "rowfloor:-1", "seed:0.1"):
        with pytest.raises(ValueError, match=f"unknown quantisation scheme '{bad}'"):
            quantize_int5(torch.randn(4, 4), bad)


def test_rowfloor_floor_is_a_knob_between_rowmse_and_the_seeds_floor():
    t = torch.randn(16, 300) * 0.01
    for scheme, floor in (("rowfloor:0.004", 0.004), ("rowfloor", 1 / 15)):
        _, s = quantize_int5(t, scheme)
        assert torch.all(s.float() >= torch.tensor(floor).half().float()), scheme
        _, s8 = quantize_int8(t, scheme)
        assert torch.all(s8.float() >= torch.tensor(floor * 15 / 127).half().float()), scheme
    assert torch.equal(quantize_int5(t, "rowfloor:0")[0], quantize_int5(t, "rowmse")[0])


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, category", [
    ("tok_emb.weight", "embed"),
    ("blocks.0.mlp.fc.weight", "mlp"),
    ("blocks.3.mlp.proj.weight", "mlp"),
    ("blocks.1.attn.c_q.weight", "attn"),
    ("blocks.1.attn.proj.weight", "attn"),
    ("bigram.proj.weight", "attn"),  # the seed counts any non-MLP .proj. as attention
    ("ve_shared.proj.weight", "attn"),
    ("bigram.embed.weight", "other"),
    ("ve_shared.embed.weight", "other"),
    ("skip_weights", "other"),
])
def test_classify_param(name, category):
    assert quant.classify_param(name) == category


@pytest.mark.parametrize("name, tensor, fmt", [
    ("blocks.0.mlp.fc.weight", torch.zeros(256, 256), quant.PASSTHROUGH),  # exactly 65,536: pass through
    ("blocks.0.mlp.fc.weight", torch.zeros(257, 256), quant.INT5_PACKED),
    ("blocks.0.attn.c_q.weight", torch.zeros(300, 300), quant.INT5_PACKED),
    ("bigram.proj.weight", torch.zeros(300, 300), quant.INT5_PACKED),
    ("tok_emb.weight", torch.zeros(1024, 512, dtype=torch.bfloat16), quant.INT8),
    ("bigram.embed.weight", torch.zeros(2048, 128), quant.INT8),
    ("skip_weights", torch.zeros(300, 300), quant.PASSTHROUGH_CTRL),
    ("blocks.2.attn.attn_gate.weight", torch.zeros(300, 300), quant.PASSTHROUGH_CTRL),  # control before attn
    ("step_counter", torch.zeros(100_000, dtype=torch.int64), quant.PASSTHROUGH),
])
def test_tensor_format(name, tensor, fmt):
    assert quant.tensor_format(name, tensor) == fmt


def test_quantize_state_dict_formats_and_names():
    sd = {
        "ints": torch.arange(70_000, dtype=torch.int32),
        "small": torch.randn(10, 10),
        "skip_weights": torch.randn(300, 300),
        "blocks.0.mlp.fc.weight": torch.randn(300, 300),
        "tok_emb.weight": torch.randn(300, 300).bfloat16(),
    }
    w, m = quant.quantize_state_dict(sd)
    assert m == {"ints": "passthrough", "small": "passthrough", "skip_weights": "passthrough_ctrl",
                 "blocks.0.mlp.fc.weight": {"type": "int5_packed"}, "tok_emb.weight": {"type": "int8"}}
    assert list(w) == ["ints", "small", "skip_weights", "blocks.0.mlp.fc.weight.q", "blocks.0.mlp.fc.weight.scale",
                       "blocks.0.mlp.fc.weight.shape", "tok_emb.weight.q", "tok_emb.weight.scale"]
    assert torch.equal(w["ints"], sd["ints"])
    assert w["small"].dtype == torch.float16 and w["skip_weights"].dtype == torch.float32
    assert w["blocks.0.mlp.fc.weight.q"].dtype == torch.uint8 and w["blocks.0.mlp.fc.weight.q"].numel() == 56_250
    assert w["blocks.0.mlp.fc.weight.shape"].tolist() == [300, 300]
    assert w["blocks.0.mlp.fc.weight.shape"].dtype == torch.int32
    assert w["tok_emb.weight.q"].dtype == torch.int8 and w["tok_emb.weight.scale"].dtype == torch.float16


# ---------------------------------------------------------------------------
# State dicts: unbank/rebank, quantise/dequantise
# ---------------------------------------------------------------------------
def test_unbank_rebank_round_trip_and_names():
    sd = trained_like_state_dict()
    L = QUANT_CFG.num_layers
    flat = quant.unbank_state_dict(sd, L)
    assert "qo_bank" not in flat
    assert torch.equal(flat["blocks.2.attn.proj.weight"], sd["qo_bank"][L + 2])
    assert torch.equal(flat["blocks.1.attn.c_v.weight"], sd["kv_bank"][L + 1])
    assert torch.equal(flat["blocks.3.mlp.proj.weight"], sd["mlp_down_bank"][3])
    names = list(flat)
    first_bank = names.index("blocks.0.attn.c_q.weight")
    assert names[first_bank:first_bank + 3] == ["blocks.0.attn.c_q.weight", "blocks.0.attn.proj.weight",
                                                "blocks.1.attn.c_q.weight"]
    back = quant.rebank_state_dict(flat, L, sd)
    assert set(back) == set(sd)
    for name in sd:
        assert torch.equal(back[name], sd[name]), name


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_state_dict_round_trip(scheme):
    sd = trained_like_state_dict()
    flat = quant.unbank_state_dict(sd, QUANT_CFG.num_layers)
    w, m = quant.quantize_state_dict(flat, scheme)
    kinds = [f if isinstance(f, str) else f["type"] for f in m.values()]
    assert kinds.count("int5_packed") == 4 * 6 and kinds.count("int8") == 1  # tok_emb; the rest is small
    out = quant.dequantize_state_dict(w, m, flat)
    for name, ref in flat.items():
        got = out[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        if m[name] == "passthrough":
            assert torch.equal(got, ref.half().to(ref.dtype)), name
        else:
            err = (got.float() - ref.float()).norm() / ref.float().norm()
            bound = 0.02 if m[name]["type"] == "int8" else 0.1
            if scheme != "rowmse":  # rows with max |w| < 1: the seed's 1/15 (1/127) floor costs most of the
                bound = 1.0 if m[name]["type"] == "int5_packed" else 0.2  # resolution, or all of it
            assert err <= bound, (name, err.item())
    back = quant.rebank_state_dict(out, QUANT_CFG.num_layers, sd)
    GPT(QUANT_CFG).load_state_dict(back)


def test_seed_floor_zeroes_the_small_projections():
    flat = quant.unbank_state_dict(trained_like_state_dict(), QUANT_CFG.num_layers)
    w, m = quant.quantize_state_dict(flat, "seed")
    q = unpack_int5(w["blocks.0.mlp.proj.weight.q"], (384, 1152))
    assert (q == 0).all()
    w2, _ = quant.quantize_state_dict(flat, "rowmse")
    assert (unpack_int5(w2["blocks.0.mlp.proj.weight.q"], (384, 1152)) != 0).float().mean() > 0.5


def test_dequantize_errors_name_the_problem():
    sd = {"blocks.0.mlp.fc.weight": torch.randn(300, 300), "tok_emb.weight": torch.randn(300, 300),
          "small": torch.randn(3)}
    w, m = quant.quantize_state_dict(sd)

    def fails(w, m, template, match):
        with pytest.raises(ArtifactError, match=match):
            quant.dequantize_state_dict(w, m, template)

    fails({k: v for k, v in w.items() if k != "tok_emb.weight.scale"}, m, sd, "lacks tensor tok_emb.weight.scale")
    fails(w, {k: v for k, v in m.items() if k != "small"}, sd, "lacks tensor small")
    fails(w, m, {**sd, "blocks.0.mlp.fc.weight": torch.empty(300, 301)},
          r"blocks.0.mlp.fc.weight has shape \(300, 300\).*expects \(300, 301\)")
    fails(w, m, {k: v for k, v in sd.items() if k != "small"}, "holds tensor small that the config")
    fails(w, {**m, "small": {"type": "int7"}}, sd, "small has unknown format")
    fails({**w, "blocks.0.mlp.fc.weight.q": w["blocks.0.mlp.fc.weight.q"][:-5]}, m, sd, "must be 56250 uint8")
