"""The judge: pure verdict logic, and the rule judge over HTTP on a real Ray Serve."""

import json
import urllib.error
import urllib.request

import pytest

from raydpo.judge.rules import combine_both_orders, compare_scores, load_rule
from raydpo.tasks import style

P = "about: apple | max 5\n"


def test_always_first_position_judge_gives_ties_not_preferences():
    """A judge that always answers "A" says "a" for (A, B) and "a" again for (B, A):
    the swap exposes it, and every verdict is a tie."""
    always_a = lambda first, second: "a"  # noqa: E731
    pairs = [("x", "y"), ("good", "bad"), ("bad", "good")]
    verdicts = [combine_both_orders(always_a(a, b), always_a(b, a)) for a, b in pairs]
    assert verdicts == ["tie", "tie", "tie"]
    assert combine_both_orders("a", "b") == "a" and combine_both_orders("b", "a") == "b"
    assert combine_both_orders("invalid", "a") == "invalid" and combine_both_orders("b", "invalid") == "invalid"


def test_compare_scores_and_tie_margin():
    assert compare_scores(0.75, 0.5).preferred == "a"
    assert compare_scores(0.5, 0.75).preferred == "b"
    j = compare_scores(0.5, 0.45, tie_margin=0.1)
    assert j.preferred == "tie" and j.margin == pytest.approx(0.05)


def test_load_rule_errors_name_the_spec():
    assert load_rule("raydpo.tasks.style:score") is style.score
    with pytest.raises(ValueError, match="must look like"):
        load_rule("raydpo.tasks.style.score")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_rule("raydpo.tasks.style:nope")


def post(url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def judge_url(serve_port):
    from ray import serve

    from raydpo.judge.apps import build_app

    port = serve_port
    # with Serve's autoscaler on (1..2 replicas), as cluster.judge.max_count > count configures it
    serve.run(build_app({"rule": "raydpo.tasks.style:score", "tie_margin": 0.0,
                         "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}}),
              name="judge", route_prefix="/judge")
    dep = serve.status().applications["judge"].deployments["ScoringJudge"]
    assert dep.status == "HEALTHY"
    yield f"http://127.0.0.1:{port}/judge"
    serve.delete("judge")


@pytest.mark.slow
def test_score_and_compare_over_http(judge_url):
    responses = [" apple is red please.", " apple.", " pear a b c d e f g h i!"]
    status, out = post(f"{judge_url}/v1/score", {"items": [{"prompt": P, "response": r} for r in responses]})
    assert status == 200 and out["judge"] == "rule:raydpo.tasks.style:score"
    assert out["scores"] == pytest.approx([style.score(P, r) for r in responses])
    status, out = post(f"{judge_url}/v1/compare", {"items": [
        {"prompt": P, "response_a": responses[0], "response_b": responses[1]},
        {"prompt": P, "response_a": responses[2], "response_b": responses[0]},
        {"prompt": P, "response_a": responses[1], "response_b": responses[1] + " "},
    ]})
    assert status == 200
    assert [r["preferred"] for r in out["results"]] == ["a", "b", "tie"]
    assert out["results"][0]["margin"] == pytest.approx(style.score(P, responses[0]) - style.score(P, responses[1]))


BAD = [
    (b"{not json", 422, "body: Invalid JSON"),
    ({"items": [{"prompt": P}]}, 422, "items.0.response: Field required"),
    ({"items": [{"prompt": P, "response": 3}]}, 422, "items.0.response: Input should be a valid string"),
    ({"items": [{"prompt": P, "response": ""}]}, 422, "items.0.response: String should have at least 1 character"),
    ({"items": []}, 422, "items: List should have at least 1 item"),
    ({"items": [{"prompt": P, "response": "x"}] * 257}, 422, "items: List should have at most 256 items"),
    ({"items": [{"prompt": P, "response": "x", "extra": 1}]}, 422, "items.0.extra: Extra inputs are not permitted"),
    ({"items": [{"prompt": "not the task", "response": "x"}]}, 422, "items.0: the judge cannot score it (ValueError"),
    (json.dumps({"items": [{"prompt": P, "response": "x" * (1 << 20)}]}).encode(), 413, "exceeds the limit"),
]


@pytest.mark.slow
@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_requests_get_4xx_naming_the_problem_and_service_survives(judge_url, body, status, message):
    got, out = post(f"{judge_url}/v1/score", body)
    assert got == status and message in out["error"], out
    ok, res = post(f"{judge_url}/v1/score", {"items": [{"prompt": P, "response": " apple."}]})
    assert ok == 200 and res["scores"] == [pytest.approx(style.score(P, " apple."))]


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_a_bad_item_fails_alone(judge_url):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"items": [{"prompt": P, "response": f" apple {i}."}]} for i in range(24)]
    bodies[5] = {"items": [{"prompt": "broken", "response": "x"}]}
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda b: post(f"{judge_url}/v1/score", b), bodies))
    assert [s for s, _ in results].count(200) == 23 and results[5][0] == 422


@pytest.mark.slow
@pytest.mark.timeout(300)  # without the limit the call waits an hour
def test_a_judge_call_that_never_returns_stops_the_caller_naming_the_limit(serve_port):
    """A stuck judge replica (here: one that sleeps through every scoring call) must not hold
    the loop forever: the call is cancelled after judge.call_timeout_s, with a JudgeError that
    names the setting; a judge that answers in time is unaffected, and one whose own code
    times out (a rule calling a service) fails with its own error, not as the call limit."""
    import asyncio
    import time

    from ray import serve

    from raydpo.errors import JudgeError
    from raydpo.judge.client import JudgeClient
    from raydpo.records import JudgeInfo

    @serve.deployment
    class Stuck:
        def info(self):
            return JudgeInfo("stuck", "rule", pairwise=False)

        async def score_items(self, items):
            if items[0][1] == "stuck":
                await asyncio.sleep(3600)
            if items[0][1] == "upstream":
                raise TimeoutError("the rule's upstream service timed out")
            return [1.0] * len(items)

    judge = JudgeClient(serve.run(Stuck.bind(), name="stuck", route_prefix="/stuck"), timeout_s=2)
    try:
        assert judge.score([(P, "fine")]) == [1.0]
        t = time.monotonic()
        with pytest.raises(JudgeError, match=r"judge.call_timeout_s=2 s"):
            judge.score([(P, "stuck")])
        assert time.monotonic() - t < 30
        assert judge.score([(P, "fine")]) == [1.0]  # the cancelled call left the replica serving
        with pytest.raises(TimeoutError, match="upstream service timed out") as e:
            judge.score([(P, "upstream")])
        assert not isinstance(e.value, JudgeError)
    finally:
        serve.delete("stuck")


def serve_yaml_app(file: str):
    """A serve/*.yaml that binds to loopback: its one application's args and builder."""
    import importlib
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "serve" / file).read_text())
    assert cfg["http_options"]["host"] == "127.0.0.1"
    [app] = cfg["applications"]
    module, name = app["import_path"].split(":")
    return app["args"], getattr(importlib.import_module(module), name)


def test_serve_yaml_builds_and_binds_to_loopback():
    args, builder = serve_yaml_app("judge_rule.yaml")
    assert builder(args) is not None
    with pytest.raises(ValueError, match=r"unknown args \['tie_margn'\]"):
        builder({"tie_margn": 0.1})


def test_the_remote_judge_yaml_builds_and_its_settings_are_checked():
    args, builder = serve_yaml_app("judge_openai.yaml")
    assert builder(args) is not None
    with pytest.raises(ValueError, match=r"unknown settings \['max_retrys'\]; known: base_url, model"):
        builder({"settings": {**args["settings"], "max_retrys": 3}})
    with pytest.raises(ValueError, match="settings.base_url is required"):
        builder({"settings": {"model": "m"}})
    with pytest.raises(ValueError, match=r"settings.template must use .* missing \['response_b'\]"):
        builder({"settings": {**args["settings"], "template": "{prompt} {response_a}"}})


def test_a_pairwise_remote_judge_without_a_template_asks_with_the_default():
    """The YAML route may leave settings.template out: the default template, not None.format."""
    import asyncio

    from raydpo.errors import JudgeError
    from raydpo.judge.remote import RemoteJudgeCore, RemoteSettings

    s = RemoteSettings(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None, max_retries=0, timeout_s=5)

    async def ask():
        return await RemoteJudgeCore(s, None).compare(P, " a", " b")

    with pytest.raises(JudgeError, match="no answer after 1 attempts .last: connection failed"):  # it got as far as asking
        asyncio.run(ask())


def test_wilson_interval_against_its_definition():
    """Wilson's interval is the set of p with |p_hat - p| <= z sqrt(p (1 - p) / n): found by bisection."""
    import math

    from raydpo.judge.evaluate import Z95, wilson

    def edge(p_hat, n, lo, hi):  # the p in [lo, hi] where the inequality turns
        inside = lambda p: abs(p_hat - p) <= Z95 * math.sqrt(p * (1 - p) / n)  # noqa: E731
        want = inside(hi)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if inside(mid) == want else (mid, hi)
        return (lo + hi) / 2

    for p_hat, n in ((0.75, 40), (0.5, 10), (0.95, 200), (0.0, 12)):
        lo, hi = wilson(p_hat, n)
        assert lo == pytest.approx(edge(p_hat, n, 0.0, p_hat) if p_hat > 0 else 0.0, abs=1e-9)
        assert hi == pytest.approx(edge(p_hat, n, p_hat, 1.0), abs=1e-9)


@pytest.mark.slow
def test_judge_eval_scores_the_rule_judge_against_labels(tmp_path):
    """30 pairs labelled as the style rule ranks them, 10 labelled the other way, a bad record
    and a chat pair: the rule judge is right on 30 of 40, and both others are skipped."""
    import random

    from tests.helpers.proc import free_port, run_py

    rng, lines = random.Random(0), []
    for prompt in style.split_prompts()[1]:
        a, b = style.demonstration(prompt, rng), style.demonstration(prompt, rng)
        if style.score(prompt, a) == style.score(prompt, b):
            continue
        good, bad = (a, b) if style.score(prompt, a) > style.score(prompt, b) else (b, a)
        chosen, rejected = (good, bad) if len(lines) < 30 else (bad, good)
        lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
        if len(lines) == 40:
            break
    lines.insert(7, '{"prompt": "p", "chosen": 3}')
    lines.append(json.dumps({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}))
    (tmp_path / "labelled.jsonl").write_text("\n".join(lines) + "\n")
    r = run_py(["-m", "raydpo.cli", "judge", "eval", str(tmp_path / "labelled.jsonl"), f"run_dir={tmp_path / 'run'}",
                f"cluster.port={free_port()}", "cluster.num_cpus=2"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = " ".join(r.stdout.split())
    assert "labelled pairs judged 40 skipped records 2" in out, out
    assert "correct / wrong / ties / invalid 30 / 10 / 0 / 0" in out, out
    assert "accuracy (ties half) 0.750 [95% CI 0.598, 0.858]" in out, out
    assert "position consistency 1.000 tie rate / invalid rate 0.000 / 0.000" in out, out
    missing = run_py(["-m", "raydpo.cli", "judge", "eval", str(tmp_path / "none.jsonl")], timeout=60)
    assert missing.returncode == 2 and "none.jsonl: no such file or folder" in missing.stderr
