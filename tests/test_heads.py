"""Learned heads: fitting, artefacts and their checks, the head scorer, relative scoring in the
agent. A test-double backend gives hidden states as a fixed function of the reviewed reply;
the real llama.cpp paths are in test_heads_model.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import quoted_reply
from safetygame.agent import SafetyGame, Status
from safetygame.backends.base import (
    Backend,
    Completion,
    HiddenStates,
    LogLik,
    Message,
    SamplingConfig,
    YesNo,
    pool_hidden,
)
from safetygame.cache import ScoreCache
from safetygame.errors import BackendError, BackendUnsupported, ConfigError
from safetygame.features import FeatureReader, Reading, review_messages
from safetygame.heads import (
    HEADS_DIR,
    FeatureSpec,
    Head,
    HeadParams,
    fit_head,
    gated_logit,
    load_head,
)
from safetygame.models import DEFAULT_MODEL, resolve_model
from safetygame.policy import load_policy
from safetygame.scorers import HeadScorer, build_scorer

DIM = 4
POLICY = load_policy()


def vec_of(reply: str) -> np.ndarray:
    """Feature 0 says how harmful a reply is (by a keyword); the rest is noise."""
    rng = np.random.default_rng(abs(hash(reply)) % 2**32)
    v = rng.normal(0, 0.1, DIM)
    v[0] = 3.0 if "bleach" in reply else -3.0 if "sorry" in reply.lower() else 0.0
    return v


class HiddenDouble(Backend):
    """Test double: samples from a list; hidden states are ``vec_of`` the reviewed reply."""

    model_id = "hidden-double@0123456789ab"

    def __init__(self, answers: Sequence[str] = (), fail: Exception | None = None) -> None:
        self.answers = list(answers)
        self.fail = fail
        self.reads = 0

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        return [Completion(self.answers[i % len(self.answers)]) for i in range(n)]

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        # the helpfulness probe: the policy refusal does not help, every other reply does
        return YesNo(0.1 if "can't help" in messages[-1].content else 0.9, "logprobs", 1.0)

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        raise NotImplementedError

    async def hidden(self, messages: Sequence[Message]) -> HiddenStates:
        if self.fail is not None:
            raise self.fail
        self.reads += 1
        v = vec_of(quoted_reply(messages[-1].content)).astype(np.float32)
        return HiddenStates({"last": v, "mean": (v / 2).astype(np.float32)}, n_tokens=7)


def spec(**kw: object) -> FeatureSpec:
    base = dict(model_id=HiddenDouble.model_id, model_sha256="ab" * 32, pooling="last",
                prompt="review-v1/600", dim=DIM)  # fmt: skip
    return FeatureSpec(**{**base, **kw})  # type: ignore[arg-type]


def head(
    objective: str = "bradley_terry",
    gate_w: tuple[float, ...] = (),
    gate_b: float = 0.0,
    **kw: object,
) -> Head:
    params = HeadParams(mu=(0.0,) * DIM, sigma=(1.0,) * DIM, w=(1.0, 0.0, 0.0, 0.0), b=0.0,
                        gate_w=gate_w, gate_b=gate_b)  # fmt: skip
    base = dict(name="t", kind="harm", objective=objective, features=spec(), params=params,
                ridge=1.0)  # fmt: skip
    return Head(**{**base, **kw})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fitting


def test_pool_hidden_gives_last_token_and_mean() -> None:
    m = np.array([[1.0, 2.0], [3.0, 6.0]])
    out = pool_hidden(m)
    assert out["last"].tolist() == [3.0, 6.0] and out["mean"].tolist() == [2.0, 4.0]
    for bad in (np.zeros((0, 2)), np.array([1.0, 2.0]), np.array([[np.nan, 1.0]])):
        with pytest.raises(ValueError):
            pool_hidden(bad)


def _data(n: int, seed: int) -> tuple[np.ndarray, list[tuple[int, float]], list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 1, (2 * n, DIM))
    X[:n, 0] += 2.0  # the first n rows are the harmful ones
    points = [(i, 1.0 if i < n else 0.0) for i in range(2 * n)]
    pairs = [(i, i + n) for i in range(n)]
    return X, points, pairs


@pytest.mark.parametrize("objective", ["logistic", "bradley_terry"])
def test_fit_head_learns_the_direction_that_separates(objective: str) -> None:
    X, points, pairs = _data(60, 0)
    p = fit_head(X, objective=objective, ridge=1.0, points=points, pairs=pairs)  # type: ignore[arg-type]
    assert int(np.argmax(np.abs(p.w))) == 0 and p.w[0] > 0
    if objective == "bradley_terry":
        assert p.b == 0.0  # pairs enter in both orders: no position bias to absorb
    z = ((X - np.asarray(p.mu)) / np.asarray(p.sigma)) @ np.asarray(p.w) + p.b
    assert np.mean([z[a] > z[c] for a, c in pairs]) > 0.85
    assert np.allclose(p.logit(X), z)


def test_gated_head_separates_harmful_from_benign_compliance() -> None:
    """Feature 0 says "complies", feature 1 says "harmful content": a refusal reads low
    whatever feature 1 says, and among complying replies the harmful ones read high. One
    logistic head on the same rows ranks by compliance and misorders benign compliance
    above refusals that carry harmful-looking words."""
    rng = np.random.default_rng(3)
    n = 80
    comply = np.r_[np.ones(2 * n), np.zeros(n)]
    harmful = np.r_[np.ones(n), np.zeros(n), rng.integers(0, 2, n)]  # refusals: either
    X = rng.normal(0, 0.5, (3 * n, DIM))
    X[:, 0] += 3 * comply
    X[:, 1] += 3 * harmful
    gate = [(i, float(comply[i])) for i in range(3 * n)]
    content = [(i, float(harmful[i])) for i in range(2 * n)]  # complying rows only
    p = fit_head(X, objective="gated", ridge=1.0, points=content, gate_points=gate)
    z = p.logit(X)
    assert len(p.gate_w) == DIM and int(np.argmax(np.abs(p.gate_w))) == 0
    assert z[:n].min() > z[n : 2 * n].max()  # harmful compliance above benign compliance
    assert z[:n].min() > z[2 * n :].max()  # ... and above every refusal
    # the product is a probability: logit(sigmoid(g) * sigmoid(f)) <= min(g, f)
    g = HeadParams(p.mu, p.sigma, p.gate_w, p.gate_b).logit(X)
    f = HeadParams(p.mu, p.sigma, p.w, p.b).logit(X)
    assert np.all(z <= np.minimum(g, f) + 1e-9)
    with pytest.raises(ConfigError, match="gate"):
        fit_head(X, objective="gated", ridge=1.0, points=content)


@settings(max_examples=50, deadline=None)
@given(st.floats(-800, 800), st.floats(-800, 800))
def test_gated_logit_is_finite_and_matches_the_product(g: float, f: float) -> None:
    z = float(gated_logit(np.array([g]), np.array([f]))[0])
    assert np.isfinite(z)
    p = 1 / (1 + np.exp(-np.clip(g, -700, 700))) / (1 + np.exp(-np.clip(f, -700, 700)))
    if 1e-12 < p < 1 - 1e-9:
        assert abs(z - np.log(p / (1 - p))) < 1e-6


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_fit_head_is_deterministic(seed: int) -> None:
    X, _points, pairs = _data(10, seed)
    one = fit_head(X, objective="bradley_terry", ridge=10.0, pairs=pairs)
    two = fit_head(X.copy(), objective="bradley_terry", ridge=10.0, pairs=list(pairs))
    assert one == two


def test_fit_head_rejects_bad_input() -> None:
    X, points, _pairs = _data(5, 1)
    with pytest.raises(ConfigError, match="ridge"):
        fit_head(X, objective="logistic", ridge=0.0, points=points)
    with pytest.raises(ConfigError, match="pairs"):
        fit_head(X, objective="bradley_terry", ridge=1.0, pairs=[])
    with pytest.raises(ConfigError, match="objective"):
        fit_head(X, objective="svm", ridge=1.0, points=points)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="both classes"):
        fit_head(X, objective="logistic", ridge=1.0, points=[(0, 1.0), (1, 1.0)])


# --------------------------------------------------------------------------- artefacts


def test_artefact_round_trips_byte_for_byte(tmp_path: Path) -> None:
    h = head(training={"seed": 0}, quality={"dev": {"dev_score": 0.9}})
    path = h.save(tmp_path / "t.json")
    back = load_head(path)
    assert back == h and back.to_json() == path.read_text()
    gated = head("gated", gate_w=(0.0, 1.0, 0.0, 0.0), gate_b=-0.5)
    back = load_head(gated.save(tmp_path / "g.json"))
    assert back == gated and not back.relative
    assert np.allclose(back.logit(np.eye(DIM)), gated.params.logit(np.eye(DIM)))
    with pytest.raises(ConfigError, match="gate_w"):
        head("gated")  # a gated head without its gate
    with pytest.raises(ConfigError, match="gate_w"):
        head("logistic", gate_w=(0.0,) * DIM)


def test_artefact_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found: .*nope\.json.*scorers train"):
        load_head(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is unreadable or not JSON"):
        load_head(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError, match="not a safetygame-head/1 artefact"):
        load_head(bad)
    data = json.loads(head().to_json())
    data["w"] = data["w"][:-1]  # a dimension mismatch inside the file
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json.*feature dimension 4"):
        load_head(bad)
    data = json.loads(head().to_json())
    del data["sigma"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json is malformed"):
        load_head(bad)


def test_head_refuses_features_of_another_model_naming_both() -> None:
    h = head()
    with pytest.raises(
        ConfigError, match=r"fitted on hidden-double@0123456789ab.*judge is other@1"
    ):
        h.check_model("other@1")
    with pytest.raises(ConfigError, match="sha256"):
        h.check_model(HiddenDouble.model_id, "cd" * 32)
    h.check_model(HiddenDouble.model_id, "ab" * 32)
    with pytest.raises(ConfigError, match="4-dimensional features, got 3"):
        h.logit(np.zeros(3))


def test_build_scorer_with_a_head_bound_to_another_model(tmp_path: Path) -> None:
    path = head().save(tmp_path / "h.json")

    class Other(HiddenDouble):
        model_id = "other-model@ffffffffffff"

    with pytest.raises(ConfigError, match="other-model@ffffffffffff"):
        build_scorer(f"head:{path}", Other(), POLICY)
    assert build_scorer(f"head:{path}", HiddenDouble(), POLICY).relative


# --------------------------------------------------------------------------- scoring


def test_feature_reader_caches_both_poolings() -> None:
    backend, cache = HiddenDouble(), ScoreCache(None)
    conv = (Message("user", "q"),)

    async def go() -> tuple[float, float, bool]:
        a = await FeatureReader(backend, "last", cache).read(conv, "Mix bleach")
        b = await FeatureReader(backend, "mean", cache).read(conv, "Mix bleach")
        return float(a.vector[0]), float(b.vector[0]), b.cached

    last0, mean0, cached = asyncio.run(go())
    assert (last0, mean0, cached) == (3.0, 1.5, True) and backend.reads == 1


def test_concurrent_reads_of_one_reply_share_one_hidden_state_call() -> None:
    backend, cache = HiddenDouble(), ScoreCache(None)
    conv = (Message("user", "q"),)

    async def go() -> list[Reading]:
        return list(
            await asyncio.gather(
                FeatureReader(backend, "last", cache).read(conv, "Mix bleach"),
                FeatureReader(backend, "mean", cache).read(conv, "Mix bleach"),
            )
        )

    last, mean = asyncio.run(go())
    assert backend.reads == 1  # one call, each reader its own pooling
    assert (float(last.vector[0]), float(mean.vector[0])) == (3.0, 1.5)
    assert (last.cached, mean.cached) == (False, True)


def test_review_prompt_is_quoted_and_cut() -> None:
    msgs = review_messages((Message("system", "sys"), Message("user", "x" * 5000)), "<b>" * 400)
    body = msgs[-1].content
    assert [m.role for m in msgs] == ["user"] and "sys" not in body
    assert "&lt;b&gt;" in body and "<b>" not in body
    assert body.count("x") == 600 and body.count("&lt;b&gt;") == 200 and " [...]" in body


def test_bt_head_scores_against_the_reference() -> None:
    scorer = HeadScorer(HiddenDouble(), head())
    conv = (Message("user", "clean the sink?"),)

    async def go() -> tuple[float | None, float | None, str | None]:
        hi = await scorer.score_against(conv, "Mix bleach.", "Sorry, no.", "q")
        lo = await scorer.score_against(conv, "Sorry, no.", "Mix bleach.", "q")
        alone = await scorer.score(conv, "Mix bleach.", "q")
        return hi.value, lo.value, alone.error

    hi, lo, err = asyncio.run(go())
    assert hi is not None and lo is not None and hi > 0.99 and abs(hi + lo - 1) < 1e-9
    assert err is not None and "relative" in err


def test_logistic_head_scores_alone() -> None:
    scorer = HeadScorer(HiddenDouble(), head("logistic"))
    s = asyncio.run(scorer.score((Message("user", "q"),), "Mix bleach.", "q"))
    assert not scorer.relative and s.value is not None and s.value > 0.9 and s.calls == 0


def test_a_head_on_another_feature_model_is_named_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A MiniLM head behind a llama.cpp judge: the audit's scorer id names MiniLM, whose
    features it reads, not the judge it never asks."""

    class Reader:
        model_id, model_sha256 = "all-MiniLM-L6-v2", "cd" * 32

    monkeypatch.setattr("safetygame.scorers.reader_for", lambda spec, backend, cache: Reader())
    h = head("logistic", features=spec(model_id=Reader.model_id, model_sha256=Reader.model_sha256))
    assert HeadScorer(HiddenDouble(), h).name == "head:t:all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    "exc", [BackendUnsupported("no /v1/embeddings at http://x"), BackendError("down")]
)
def test_unreadable_features_refuse_with_the_reason_never_another_scorer(exc: Exception) -> None:
    pol = POLICY.model_copy(update={"sampling": POLICY.sampling.model_copy(update={"n": 2})})
    backend = HiddenDouble(["Mix bleach."], fail=exc)
    agent = SafetyGame(backend, pol, harm=HeadScorer(backend, head()), cache=ScoreCache(None))
    d = agent.respond("How do I clean?")
    assert d.status == Status.SCORING_FAILED and d.action == "refuse"
    assert type(exc).__name__ in d.reason and d.chosen_text == pol.refusal


def test_agent_reads_margins_against_the_refusal() -> None:
    pol = POLICY.model_copy(update={"sampling": POLICY.sampling.model_copy(update={"n": 2})})
    backend = HiddenDouble(["Mix bleach and ammonia.", "Use vinegar."])
    agent = SafetyGame(backend, pol, harm=HeadScorer(backend, head()), cache=ScoreCache(None))
    d = agent.respond("How do I clean?", budget=0.0)
    by_text = {c.text: c for c in d.candidates}
    refusal = by_text[pol.refusal]
    assert refusal.harm["harm"] == 0.5 and refusal.extra_risk["harm"] == 0.0
    bleach = by_text["Mix bleach and ammonia."]
    risk = bleach.extra_risk["harm"]
    assert risk is not None and risk > 0.4 and bleach.weight == 0.0  # over any budget of 0
    assert d.status == Status.OK and d.chosen_text == "Use vinegar."
    assert d.scorer_ids["harm"].startswith("head:t:")


# --------------------------------------------------------------------------- CLI


def test_scorers_list_shows_every_design_with_its_cost() -> None:
    from click.testing import CliRunner

    from safetygame.cli import main
    from safetygame.scorers import DESIGNS

    out = CliRunner().invoke(main, ["scorers", "list", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["designs"]
    assert {r["design"] for r in rows} == set(DESIGNS)
    assert all(r["cost"] != "-" for r in rows)
    # prompt designs show the quality the shipped report measured for them, heads theirs
    report = json.loads((HEADS_DIR / "quality.json").read_text(encoding="utf-8"))
    for name, q in report["designs"].items():
        (row,) = [r for r in rows if r["design"] == name]
        assert row["xstest_auroc"] == q["xstest_complying_vs_refusal"]["auroc"]


@pytest.mark.parametrize("size", ["hh_train", "hh_train=x", "seed=3", "nope=2"])
def test_scorers_train_rejects_a_bad_size_before_any_model_work(size: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from safetygame.cli import main

    cache = tmp_path / "c.sqlite"
    out = CliRunner().invoke(main, ["scorers", "train", "--size", size, "--cache", str(cache)])
    assert out.exit_code == 2 and "--size" in out.output and not cache.exists()


def test_the_learned_policy_plays_the_shipped_gated_head_of_the_default_model_only() -> None:
    for ref in ("default", "fast", "adaptive", "learned"):
        assert load_policy(ref).id == ref
    pol = load_policy("learned")

    class DefaultJudge(HiddenDouble):
        model_id = resolve_model(DEFAULT_MODEL).model_id

    scorer = build_scorer(pol.scorers.harm, DefaultJudge(), pol, kind="harm")
    assert isinstance(scorer, HeadScorer) and scorer.head.objective == "gated"
    assert not scorer.relative and len(scorer.head.params.gate_w) == scorer.head.features.dim
    with pytest.raises(ConfigError, match=r"no shipped gated harm head for the judge hidden-"):
        build_scorer(pol.scorers.harm, HiddenDouble(), pol, kind="harm")
