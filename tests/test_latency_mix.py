"""The committed latency mix: ids only, 80% benign / 20% unsafe in every prefix, and the
same ids as the selection rule gives on the benchmark data (where the data is present)."""

from __future__ import annotations

import json

import pytest

from safetygame.bench.mix import MIX_FILE, RULE, select_mix


def test_committed_mix_is_ids_in_80_20_order() -> None:
    spec = json.loads(MIX_FILE.read_text(encoding="utf-8"))
    assert set(spec) == {"seed", "rule", "ids"} and spec["rule"] == RULE
    ids = spec["ids"]
    assert len(ids) == len(set(ids)) == 50
    unsafe = [i for i, x in enumerate(ids) if x.startswith("xstest/")]
    assert unsafe == list(range(4, 50, 5))  # every fifth: any --limit keeps the 80/20 mix
    benign = [x.split("/")[0] for x in ids if not x.startswith("xstest/")]
    assert benign == ["truthfulqa", "hhh"] * 20


@pytest.mark.usefixtures("benchmark_data")  # the benchmark texts are not committed
def test_committed_mix_follows_its_rule() -> None:
    spec = json.loads(MIX_FILE.read_text(encoding="utf-8"))
    assert select_mix(spec["seed"]) == spec["ids"]
