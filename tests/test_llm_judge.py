"""The pairwise LLM judge: answer parsing (pure), and the vLLM-backed Serve app on the
tiny model. The tiny model is no judge of quality; the point is the mechanics: both
orders asked, a judge that always names position A gives ties, unparseable answers
are counted as invalid, never defaulted."""

import json
import urllib.error
import urllib.request

import pytest

from raydpo.judge.rules import DEFAULT_TEMPLATE, check_template, parse_verdict, render_judge_prompt

P = "about: apple | max 5\n"
AB = {"A": "a", "B": "b"}


def test_parse_verdict():
    pat = r"\b([AB])\b"
    assert parse_verdict(" A", pat, AB) == "a"
    assert parse_verdict("I pick B. A was worse", pat, AB) == "b"  # the first match decides
    assert parse_verdict("Both are fine", pat, AB) == "invalid"
    assert parse_verdict("", pat, AB) == "invalid"
    assert parse_verdict("Answer: 2", r"([12])", {"1": "a", "2": "b"}) == "b"
    assert parse_verdict("C", r"([A-C])", AB) == "invalid"  # matched, but not a known answer


def test_template_checks():
    check_template(DEFAULT_TEMPLATE)
    text = render_judge_prompt(DEFAULT_TEMPLATE, "q", "first", "second")
    assert "Response A:\nfirst" in text and "Response B:\nsecond" in text
    with pytest.raises(ValueError, match=r"missing \['response_b'\]"):
        check_template("{prompt} {response_a}")
    with pytest.raises(ValueError, match=r"unknown \['score'\]"):
        check_template("{prompt} {response_a} {response_b} {score}")


def post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


ITEMS = [{"prompt": P, "response_a": " apple is red please.", "response_b": " stone"},
         {"prompt": P, "response_a": " stone", "response_b": " apple is red please."},
         {"prompt": "about: river | max 3\n", "response_a": " river.", "response_b": " river thanks."}]


@pytest.mark.slow
def test_a_judge_that_always_answers_a_gives_ties(serve_port, tiny_model_dir, tiny_tokenizer):
    from ray import serve

    from raydpo.judge.llm import build_app

    # every character the tiny model can write reads as "A": whatever it says, it says A
    chars = {c for t in range(len(tiny_tokenizer)) for c in tiny_tokenizer.decode([t])}
    serve.run(build_app({"model_path": str(tiny_model_dir), "answer_pattern": r"([\s\S])",
                         "answers": {c: "a" for c in chars}, "max_model_len": 256, "num_cpus": 0.5}),
              name="llm_a", route_prefix="/llm_a")
    url = f"http://127.0.0.1:{serve_port}/llm_a"
    status, out = post(f"{url}/v1/compare", {"items": ITEMS})
    assert status == 200, out
    assert [r["parsed"] for r in out["results"]] == [["a", "a"]] * 3  # position A both times ...
    assert [r["preferred"] for r in out["results"]] == ["tie"] * 3  # ... is no preference
    assert out["invalid"] == 0 and out["judge"] == "llm:model"
    assert get(f"{url}/v1/judge")["counts"]["tie"] == 3
    serve.delete("llm_a")


@pytest.mark.slow
def test_unparseable_answers_are_counted_invalid_and_bad_requests_are_4xx(serve_port, tiny_model_dir):
    from ray import serve

    from raydpo.judge.llm import build_app

    serve.run(build_app({"model_path": str(tiny_model_dir), "max_model_len": 256, "num_cpus": 0.5}),
              name="llm", route_prefix="/llm")
    url = f"http://127.0.0.1:{serve_port}/llm"
    status, out = post(f"{url}/v1/compare", {"items": ITEMS})
    assert status == 200
    for r in out["results"]:  # whatever the untrained model wrote, the verdict follows from its two answers
        assert r["parsed"] == [parse_verdict(t, r"\b([AB])\b", AB) for t in r["answers"]]
    # the untrained tiny model does not write a lone "A" or "B": every item is invalid, and counted
    assert out["invalid"] == 3 and all(r["preferred"] == "invalid" for r in out["results"])
    assert get(f"{url}/v1/judge")["counts"]["invalid"] == 3

    status, out = post(f"{url}/v1/score", {"items": [{"prompt": P, "response": " x"}]})
    assert status == 400 and "pairwise judge" in out["error"]
    status, out = post(f"{url}/v1/compare", {"items": [{"prompt": P, "response_a": " x"}]})
    assert status == 422 and "items.0.response_b: Field required" in out["error"]
    status, out = post(f"{url}/v1/compare", {"items": [{"prompt": P * 200, "response_a": " x", "response_b": " y"}]})
    assert status == 413 and "exceeds the judge's context" in out["error"]
    status, _ = post(f"{url}/v1/compare", {"items": ITEMS[:1]})
    assert status == 200  # still answering
    serve.delete("llm")


@pytest.mark.slow
def test_a_bad_llm_judge_template_is_one_config_line_not_a_traceback(tmp_path, tiny_model_dir):
    """The app builders check their args with ValueError (what `serve run` shows); deployed from
    a run's config (the loop, `raydpo judge eval`) that was a traceback: now a ConfigError."""
    from raydpo.config_io import load_config
    from raydpo.errors import ConfigError
    from raydpo.judge.kinds import build

    cfg = load_config(None, [f"run_dir={tmp_path}", "judge.kind=llm", f"judge.model_path={tiny_model_dir}",
                             "judge.template=no fields at all"])
    with pytest.raises(ConfigError, match="judge.kind=llm: .*template"):
        build(cfg)
