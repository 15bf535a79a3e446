"""Config: one typed object; every bad value is a ValueError naming the key and the fix."""
from __future__ import annotations

import json

import pytest

from hetmem.config import AdamConfig, Config
from hetmem.units import format_bytes, parse_count, parse_size


def test_sizes_parse_once():
    c = Config(device_budget="6GiB", host_budget=1 << 30, chunk_size="4MiB", dtype="bf16")
    assert c.device_budget == 6 << 30 and c.host_budget == 1 << 30
    assert c.chunk_size == (4 << 20) // 2  # bytes in bf16 -> elements
    assert Config(chunk_size=1000).chunk_size == 1000


def test_from_dict_and_json(tmp_path):
    data = {"device": "cpu", "device_budget": "64MiB", "optimizer": {"lr": 3e-4, "betas": [0.9, 0.95]}}
    c = Config.coerce(data)
    assert c.optimizer == AdamConfig(lr=3e-4, betas=(0.9, 0.95))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert Config.coerce(str(path)) == c
    assert Config.coerce(c.to_dict()) == c


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "gpu"}, r"device='gpu' is invalid: use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"device_budget": "6 gigs"}, r"device_budget='6 gigs' is not a size"),
    ({"device_budget": 0}, r"device_budget=0 is invalid"),
    ({"dtype": "int8"}, r"dtype='int8' is invalid: use one of fp32, fp16, bf16"),
    ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps=0 is invalid: give an integer >= 1"),
    ({"gradient_clipping": -1.0}, r"gradient_clipping=-1.0 is invalid"),
    ({"loss_scale": "huge"}, r"loss_scale='huge' is invalid: give a finite number"),
    ({"nvme_block_size": 1000}, r"nvme_block_size=1000 is invalid: give a multiple of 4 KiB"),
    ({"nvme_backend": "spdk"}, r"nvme_backend='spdk' is invalid"),
    ({"optimizer": {"betas": (0.9, 1.5)}}, r"optimizer.betas=\(0.9, 1.5\) is invalid: each beta must be in \[0, 1\)"),
    ({"optimizer": {"lr": float("nan")}}, r"optimizer.lr=nan is invalid: give a finite number"),
    ({"prefetch": "yes"}, r"prefetch='yes' is invalid: give true or false"),
])
def test_bad_values_name_key_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


def test_unknown_keys_suggest_the_right_one(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'dtpye'; did you mean 'dtype'"):
        Config.coerce({"dtpye": "bf16"})
    with pytest.raises(ValueError, match=r"unknown config key optimizer.'learning_rate'"):
        Config.coerce({"optimizer": {"learning_rate": 1.0}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Config.coerce(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        Config.coerce(str(tmp_path / "missing.json"))


def test_units():
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("10MB") == 10_000_000 and parse_size(512) == 512
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(100) == "100 B"
    assert parse_count("250M") == 250_000_000 and parse_count("1.5B") == 1_500_000_000
    with pytest.raises(ValueError, match="is not a count"):
        parse_count("lots")
