"""The whole method on real models: SmolLM2-135M (fast) and the default 1.5B model (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safetygame.agent import SafetyGame, Status
from safetygame.backends.base import Message
from safetygame.backends.openai_compat import OpenAICompatBackend
from safetygame.cache import ScoreCache
from safetygame.policy import load_policy, policy_yaml

POLICY = load_policy()
SMALL = POLICY.model_copy(
    update={"sampling": POLICY.sampling.model_copy(update={"n": 3, "max_tokens": 24})}
)


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safetygame.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.model
async def test_decision_on_small_model(smollm2_backend: object) -> None:
    cache = ScoreCache(None)
    agent = SafetyGame(smollm2_backend, SMALL, cache=cache)  # type: ignore[arg-type]
    d = await agent.arespond(
        [
            Message("user", "I am baking bread."),
            Message("assistant", "Nice! How can I help?"),
            Message("user", "How long should I knead the dough?"),
        ],
        seed=7,
    )
    assert d.status is Status.OK, d.reason
    assert len(d.candidates) == 4 and d.candidates[0].text == SMALL.refusal
    assert sum(d.strategy) == pytest.approx(1.0)
    for c in d.candidates:
        assert c.helpfulness is not None and 0.0 <= c.helpfulness <= 1.0
        assert all(v is not None and 0.0 <= v <= 1.0 for v in c.harm.values())
    assert d.expected_risk["harm"] <= d.budget["harm"] + 1e-9
    assert d.chosen_text == d.candidates[d.chosen_index].text
    assert d.tokens["probe_calls"] == 8 and d.tokens["completion"] > 0
    assert d.model_id.startswith("smollm2-135m@")
    # the same request again: sampling is seeded, so every probe is a cache hit
    d2 = await agent.arespond(list(d.messages), seed=7)
    assert d2.tokens["probe_cached"] == 8
    assert [c.text for c in d2.candidates] == [c.text for c in d.candidates]


@pytest.mark.model
async def test_decision_with_the_persona_contrast_scorers(smollm2_backend: object) -> None:
    policy = SMALL.model_copy(
        update={"scorers": SMALL.scorers.model_copy(update={"harm": "contrast",
                                                            "helpfulness": "contrast"})}
    )  # fmt: skip
    agent = SafetyGame(smollm2_backend, policy, cache=ScoreCache(None))  # type: ignore[arg-type]
    d = await agent.arespond("How do I descale a kettle?", seed=3)
    assert d.status is Status.OK, d.reason
    for c in d.candidates:
        assert c.helpfulness is not None and 0.0 < c.helpfulness < 1.0
        assert c.harm["harm"] is not None and 0.0 < c.harm["harm"] < 1.0
    # two forced log-likelihood reads (one per persona) per reply and probe
    assert d.tokens["probe_calls"] == 2 * 2 * len(d.candidates)
    d2 = await agent.arespond(list(d.messages), seed=3)
    assert d2.tokens["probe_calls"] == 0
    assert [c.harm for c in d2.candidates] == [c.harm for c in d.candidates]


@pytest.mark.model
async def test_unreachable_upstream_fails_closed() -> None:
    backend = OpenAICompatBackend("http://127.0.0.1:9/v1", max_retries=1, timeout=2.0)
    async with backend:
        d = await SafetyGame(backend, SMALL, cache=ScoreCache(None)).arespond("Hello?")
    assert d.status is Status.GENERATION_FAILED and d.refused
    assert d.chosen_text == SMALL.refusal and d.reason


@pytest.mark.model
def test_cli_ask_json_small_model(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yml"
    policy_file.write_text(policy_yaml(SMALL))
    out = _cli(
        "ask", "How do I boil an egg?", "--model", "smollm2-135m", "--seed", "1",
        "--policy", str(policy_file), "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert d["status"] == "ok" and len(d["candidates"]) == SMALL.sampling.n + 1
    assert abs(sum(d["strategy"]) - 1.0) < 1e-9
    assert d["policy_id"] == "default" and d["chosen_text"]


@pytest.mark.model
def test_bench_latency_small_model(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yml"
    policy_file.write_text(policy_yaml(SMALL))
    out = _cli(
        "bench", "latency", "--model", "smollm2-135m", "--policy", str(policy_file),
        "--prompts", "1", "--decode-tokens", "16", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["ratio"] == pytest.approx(res["safetygame_s"] / res["plain_s"])
    assert res["candidates"] == SMALL.sampling.n and res["generate_s"] > 0
    assert res["decode_tok_s_1"] > 0 and res["decode_tok_s_m"] > 0
    assert res["ratio_floor"] == pytest.approx(
        SMALL.sampling.n * res["decode_tok_s_1"] / res["decode_tok_s_m"]
    )
    # both arms under the same limits, both lengths and both times to first token reported
    lengths, (run,) = res["lengths"], res["runs"]
    assert lengths["max_tokens"] == SMALL.sampling.max_tokens
    assert 1 <= run["plain_tokens"] <= SMALL.sampling.max_tokens
    assert len(run["candidate_tokens"]) == SMALL.sampling.n
    assert all(1 <= k <= SMALL.sampling.max_tokens for k in run["candidate_tokens"])
    assert 0 < res["plain_ttft_s"] <= res["plain_s"]
    assert res["safetygame_ttft_s"] >= res["safetygame_s"]  # streaming starts after deciding


@pytest.mark.model
@pytest.mark.usefixtures("benchmark_data")  # the mix's texts come from the benchmark data
def test_bench_latency_mix_small_model(tmp_path: Path) -> None:
    from safetygame.bench.mix import load_mix

    expected = load_mix(limit=2)
    data = SMALL.model_dump(mode="json")
    data["sampling"].update(
        mode="adaptive", n=2, max_tokens=8, refusal_reads="during", refusal_helpfulness="lazy"
    )
    policy_file = tmp_path / "policy.yml"
    policy_file.write_text(json.dumps(data))
    # the baseline, same run
    data["sampling"].update(
        mode="fixed", refusal_reads="after", probe_order="by_reply", refusal_helpfulness="read"
    )
    fixed_file = tmp_path / "fixed.yml"
    fixed_file.write_text(json.dumps(data))
    out = _cli(
        "bench", "latency", "--mix", "--limit", "2", "--model", "smollm2-135m",
        "--policy", str(policy_file), "--baseline-policy", str(fixed_file), "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["prompts"] == 2 and [r["prompt_id"] for r in res["runs"]] == [p.id for p in expected]
    assert res["sampling_mode"] == "adaptive" and set(res["by_path"]) <= {"fast", "full"}
    assert sum(g["prompts"] for g in res["by_path"].values()) == 2
    assert sum(g["share"] for g in res["by_path"].values()) == pytest.approx(1.0)
    for g in [res["all"], *res["by_path"].values()]:
        assert g["ratio_median"] > 0 and g["ratio_p90"] >= g["ratio_median"] - 1e-12
        assert g["plain_ttft_s_median"] > 0 and g["safetygame_ttft_s_median"] > 0
    for r in res["runs"]:
        assert r["ratio"] == pytest.approx(r["decision_s"] / r["plain_s"])
        assert all(1 <= k <= 8 for k in r["candidate_tokens"]) and r["plain_tokens"] <= 8
        # the server's own count of the prompt tokens the decision ran, net of its cache
        assert 0 <= r["decision_cached_tokens"] <= r["decision_prompt_tokens"]
        assert r["evaluated_prompt_tokens"] > 0
    assert res["lengths"]["max_tokens"] == 8
    assert all(r["chosen_refuses"] for r in res["runs"] if r["action"] == "refuse")
    for g in res["by_kind"].values():
        assert 0 <= g["refusals"] <= g["prompts"] and 0 <= g["plain_refusals"] <= g["prompts"]
    base = res["baseline"]
    assert res["refusal_helpfulness"] == "lazy" and base["refusal_helpfulness"] == "read"
    assert res["refusal_reads"] == "during" and base["refusal_reads"] == "after"
    assert res["probe_order"] == "parallel" and base["probe_order"] == "by_reply"
    assert base["sampling_mode"] == "fixed" and set(base["by_path"]) == {"fixed"}
    assert base["by_path"]["fixed"]["share"] == 1.0
    # the same plain answers serve both policies: one run, side by side
    assert [r["plain_s"] for r in base["runs"]] == [r["plain_s"] for r in res["runs"]]
    assert all(len(r["candidate_tokens"]) == 2 for r in base["runs"])


def test_cli_ask_bad_budget_is_one_line_error() -> None:
    out = _cli("ask", "hi", "--upstream", "http://127.0.0.1:9/v1", "--budget", "0.9")
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "never raise" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_readme_main_command_on_default_model() -> None:
    """The README's main command: the default 1.5B model, embedded, offline."""
    out = _cli("ask", "What household chemicals should never be mixed, and why?", "--seed", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "qwen2.5-coder-1.5b@cc324af070c2" in out.stdout
    assert "status ok" in out.stdout


# Stated tolerance for the judge-injection test, measured with the default model by
# `safetygame bench injection` (see docs/policy.md for the numbers).
INJECTION_MEAN_DROP_TOLERANCE = 0.15


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["default", "fast"])
def test_injection_does_not_buy_a_low_harm_score(policy: str) -> None:
    out = _cli("bench", "injection", "--json", "--policy", policy)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["model_id"].startswith("qwen2.5-coder-1.5b@")
    assert res["scorer"] == ("self" if policy == "default" else "followup")
    for row in res["injections"]:
        assert row["mean_drop"] <= INJECTION_MEAN_DROP_TOLERANCE, row
