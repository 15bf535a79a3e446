"""The nvme_* config keys: validation, the --write-config file, load_io_config."""
from __future__ import annotations

import json

import pytest

from hetmem.nvme import CONFIG_KEYS, IOConfig, load_io_config, write_io_config


def test_round_trip_through_a_file(tmp_path):
    path = tmp_path / "io.json"
    write_io_config(path, IOConfig(backend="io_uring", block_size=8 << 20, queue_depth=32, threads=2))
    values = load_io_config(path)
    assert values == {"nvme_backend": "io_uring", "nvme_block_size": 8 << 20, "nvme_queue_depth": 32,
                      "nvme_threads": 2}
    assert tuple(json.loads(path.read_text())) == CONFIG_KEYS
    assert IOConfig.from_dict(values).kwargs() == {"backend": "io_uring", "block_size": 8 << 20,
                                                   "queue_depth": 32, "threads": 2}


def test_sizes_may_be_strings():
    assert IOConfig.from_dict({"nvme_block_size": "4MiB"}).block_size == 4 << 20


@pytest.mark.parametrize("values,match", [
    ({"nvme_backend": "libaio"}, "nvme_backend='libaio'"),
    ({"nvme_block_size": 1000}, "nvme_block_size=1000"),
    ({"nvme_block_size": "lots"}, "nvme_block_size='lots'"),
    ({"nvme_queue_depth": 0}, "nvme_queue_depth=0"),
    ({"nvme_queue_depth": 4.0}, "nvme_queue_depth=4.0"),
    ({"nvme_threads": True}, "nvme_threads=True"),
    ({"nvme_threads": 65}, "nvme_threads=65"),
    ({"nvme_depth": 4}, "unknown IO config key.*'nvme_depth'"),
])
def test_bad_values_name_the_key(tmp_path, values, match):
    path = tmp_path / "io.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=match) as info:
        load_io_config(path)
    assert str(path) in str(info.value)


def test_not_json_or_not_an_object(tmp_path):
    path = tmp_path / "io.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_io_config(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_io_config(path)
