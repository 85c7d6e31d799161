"""Sanity tests of the HF oracle (tests/hf_oracle.py): config translation, cache paths, official-format round trip."""

import numpy as np
import pytest
import torch
from numerics import rel_l2

try:
    from tests import hf_oracle as H
except ImportError:  # pytest run without the repository root on sys.path
    import hf_oracle as H

SEQ = 300  # >= 256 so the HCA layer (ratio 128) emits 2 rows


@pytest.fixture(scope="module")
def cfg():
    return H.tiny_config()


@pytest.fixture(scope="module")
def model(cfg):
    return H.random_hf_model(cfg, seed=0)


@pytest.fixture(scope="module")
def tokens(cfg):
    return H.random_tokens(SEQ, cfg.vocab_size, seed=1)


@pytest.fixture(scope="module")
def full(model, tokens):
    (logits,) = H.hf_logits(model, [tokens])
    return logits


def test_hf_config_interpretation(cfg):
    h = H.hf_config(cfg)  # raises on any mismatch, incl. the ARCHITECTURE §6.2 inv_freq tables
    assert h.layer_types == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                             "compressed_sparse_attention"]
    assert h.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]
    assert not hasattr(h, "quantization_config") or h.quantization_config is None
    hq = H.hf_config(cfg, quantized=True)
    assert hq.quantization_config["expert_dtype"] == "fp4"


def test_random_model_is_fully_randomized(model, cfg):
    sd = model.state_dict()
    for name, t in sd.items():
        if "rotary_emb" in name or t.dtype not in (torch.float32,):
            continue
        assert t.std() > 0 if t.numel() > 1 else True, name  # nothing left at HF's zeros/ones init
        assert not torch.all(t == 1.0), name
    tid = sd["model.layers.0.mlp.gate.tid2eid"]
    assert tid.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert all(len(set(row)) == len(row) for row in tid.tolist())
    assert int(tid.max()) < cfg.n_routed_experts


def test_full_logits_are_sane(full, cfg):
    assert full.shape == (SEQ, cfg.vocab_size) and full.dtype == np.float32
    assert np.isfinite(full).all() and 0.1 < full.std() < 10


def test_prefill_then_decode_matches_full(model, tokens, full):
    # prefill 250 (not a multiple of 4/128); decode crosses CSA row emissions and the HCA row at p = 255
    pre, dec = H.hf_prefill_then_decode(model, tokens, 250, 8)
    assert rel_l2(pre, full[:250]) < 1e-5
    assert rel_l2(dec, full[250:258]) < 1e-5
    assert H.max_abs(dec, full[250:258]) < 1e-4


@pytest.mark.parametrize("chunks", [[97, 1, 30, 172], [3, 126, 2, 169]])
def test_chunked_matches_full(model, tokens, full, chunks):
    out = H.hf_chunked(model, tokens, chunks)
    assert rel_l2(out, full) < 1e-5 and H.max_abs(out, full) < 1e-4


def test_save_hf_names(model, tmp_path):
    names = H.save_hf(model, tmp_path / "hf")
    # HF 5.23's reverse mapping gives a hybrid naming (documented in save_hf); pin it so a change is noticed.
    assert "head.weight" in names and "model.embed_tokens.weight" in names
    assert names["model.layers.0.attn.wq_a.weight"] == ((32, 64), "F32")
    assert "model.layers.0.attn.norm.weight" in names  # the attention kv_norm
    assert names["model.layers.0.ffn.gate.tid2eid"] == ((256, 2), "I64")
    internal = H.save_hf(model, tmp_path / "hf_internal", original_format=False)
    assert internal["model.layers.0.mlp.experts.gate_up_proj"] == ((8, 64, 64), "F32")
    assert internal["model.layers.0.mlp.experts.down_proj"] == ((8, 64, 32), "F32")


def test_fp8_fp4_codecs():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    hf = Fp8Dequantize(None)
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0] * 4])  # amax 6 -> scale 1: ties to even code
    packed, scale = H.fp4_quantize(x)
    assert packed.dtype == torch.int8 and packed.shape == (1, 16) and scale.shape == (1, 1)
    assert scale.view(torch.uint8).item() == 127
    assert H.fp4_dequantize(packed, scale)[0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0]
    assert packed.view(torch.uint8)[0, 0].item() == 0x20  # element 0 (code 0) low nibble, element 1 (code 2) high

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 2, 64)[:, None]
    packed, scale = H.fp4_quantize(w)
    deq = H.fp4_dequantize(packed, scale)
    assert torch.equal(deq, hf._dequantize_one(packed, scale, output_dtype=torch.float32))
    assert torch.equal(H.fp4_qdq(deq), deq)  # idempotent
    w = torch.randn(384, 256, generator=g)
    q, s = H.fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (3, 2)
    deq = H.fp8_dequantize(q, s)
    assert torch.equal(deq, hf._dequantize_one(q, s, output_dtype=torch.float32))
    assert torch.equal(H.fp8_qdq(deq), deq)
    assert (deq - w).norm() / w.norm() < 0.05
    # partial 128-blocks: HF derives the block from the grid (192 // 2 = 96), hence the uniform scales
    w = torch.randn(32, 192, generator=g)
    w[:, 128:] *= 16
    q, s = H.fp8_quantize(w, hf_compatible=False)
    assert not torch.equal(hf._dequantize_one(q, s, output_dtype=torch.float32), H.fp8_dequantize(q, s))
    q, s = H.fp8_quantize(w)
    assert torch.equal(hf._dequantize_one(q, s, output_dtype=torch.float32), H.fp8_dequantize(q, s))


@pytest.mark.parametrize("quantize,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_official_round_trip(cfg, tokens, tmp_path, quantize, dtype):
    model = H.random_hf_model(cfg, seed=5)
    seq = tokens[:260]
    (before,) = H.hf_logits(model, [seq])
    written = H.save_official(model, tmp_path, cfg, quantize=quantize, dtype=dtype)
    (snapped,) = H.hf_logits(model, [seq])  # the model now holds dequantize(quantize(w))
    if quantize:
        assert written["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
        assert written["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
        assert written["layers.1.ffn.experts.7.w2.weight"].shape == (64, 16)  # packed FP4 [D, I/2]
        assert written["layers.1.ffn.experts.7.w2.scale"].shape == (64, 1)
        assert rel_l2(snapped, before) > 1e-3  # quantization really changed the weights
    else:
        assert np.array_equal(snapped, before)
    assert "layers.0.ffn.gate.tid2eid" in written and "layers.1.ffn.gate.bias" in written
    assert any(k.startswith("mtp.0.") for k in written)  # ignored by HF (_keys_to_ignore_on_load_unexpected)
    loaded = H.load_official(tmp_path)
    (after,) = H.hf_logits(loaded, [seq])
    assert H.max_abs(after, snapped) <= 1e-6
