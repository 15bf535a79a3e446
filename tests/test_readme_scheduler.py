"""The README's scheduler example runs as written, and its config table lists every key."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

import hetmem

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no python block after {marker}"
    return match.group(1)


def test_scheduler_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _block_after("<!-- scheduler-example -->")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md:scheduler-example", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["step 0", "step 10", "step 20"]
    sched, engine = namespace["sched"], namespace["engine"]
    assert sched.last_epoch == 30 and engine.global_step == 30
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    for key, value in namespace["model"].state_dict().items():
        assert torch.equal(saved[key], value), key
    assert all(v.numel() > 0 for v in saved.values())  # real weights, not placeholders


def test_config_table_lists_every_key():
    text = README.read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([\w.]+)` \|", text, re.M))
    keys = {f.name for f in dataclasses.fields(hetmem.Config)}
    keys |= {f"optimizer.{f.name}" for f in dataclasses.fields(hetmem.AdamConfig)}
    assert keys <= rows, f"README config table misses {sorted(keys - rows)}"
    for name in ("gradient_clipping", "dtype"):
        default = getattr(hetmem.Config(), name)
        shown = re.escape(repr(default).replace("'", '"'))
        assert re.search(rf"^\| `{name}` \| `{shown}` \|", text, re.M), name
