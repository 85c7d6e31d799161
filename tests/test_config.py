"""Config parsing in both namings (ARCHITECTURE §1) and clear errors for bad configs."""

import json

import pytest

from dsv4jax.config import ConfigError, config_from_dict, load_config

# The official `inference/config.json` of V4-Flash (ARCHITECTURE §1.1, S4), verbatim values.
OFFICIAL_FLASH = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3, "n_heads": 64,
    "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6, "score_func": "sqrtsoftplus",
    "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64,
    "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "original_seq_len": 65536, "rope_theta": 10000,
    "rope_factor": 16, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "dtype": "fp8", "scale_fmt": "ue8m0",
    "expert_dtype": "fp4", "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def test_official_naming_gives_the_shipped_flash_config():
    assert config_from_dict(OFFICIAL_FLASH) == load_config("configs/deepseek-v4-flash.json")


def test_hf_naming_gives_the_same_config():
    flash = load_config("configs/deepseek-v4-flash.json")
    hf = flash.to_json_dict()
    ratios = hf.pop("compress_ratios")
    hf.pop("qk_rope_head_dim")
    hf.pop("num_hash_layers")
    names = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    hf["layer_types"] = [names[r] for r in ratios[:43]]  # HF drops the MTP entry (ARCHITECTURE §1.3)
    hf["mlp_layer_types"] = ["hash_moe"] * 3 + ["moe"] * 40
    hf["partial_rotary_factor"] = 0.125
    hf["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": 10000.0},
                             "compress": dict(hf.pop("rope_scaling"), rope_type="yarn", rope_theta=160000.0)}
    assert config_from_dict(hf) == flash


def test_pro_config_layer_schedule():
    pro = load_config("configs/deepseek-v4-pro.json")
    assert len(pro.compress_ratios) == 62 and pro.compress_ratios[-1] == 0
    assert [pro.layer_type(i) for i in (0, 1, 2, 3, 60)] == [
        "heavily_compressed_attention", "heavily_compressed_attention", "compressed_sparse_attention",
        "heavily_compressed_attention", "compressed_sparse_attention"]


@pytest.mark.parametrize("change, field", [
    ({"compress_ratios": [0, 0] + [4, 64] * 20 + [4, 0]}, "compress_ratios[3] = 64"),
    ({"n_heads": 60}, "o_groups"),
    ({"dim": "4096"}, "hidden_size"),
    ({"n_activated_experts": 300}, "num_experts_per_tok"),
    ({"score_func": "softmax"}, "scoring_func"),
    ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries"),
    ({"rope_head_dim": 513}, "rope_head_dim"),
    ({"n_mtp_layers": 3}, "num_mtp_layers"),
])
def test_malformed_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(dict(OFFICIAL_FLASH, **change))


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(OFFICIAL_FLASH, o_groups=7)))
    with pytest.raises(ConfigError, match=r"config.json: num_attention_heads \(64\) must be divisible by o_groups"):
        load_config(tmp_path)
