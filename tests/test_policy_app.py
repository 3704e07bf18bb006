"""The OpenAI-compatible policy app on a real Serve deployment: the official `openai`
client, a published weight update that changes the answering version (and the
answer), and bad requests that get 4xx and leave the service answering."""

import httpx
import openai
import pytest
import ray
import torch

pytestmark = pytest.mark.slow  # starts Ray, vLLM or Serve, or trains: `make test-fast` leaves it out


PROMPT = "about: apple | max 5\n"


@pytest.fixture(scope="module")
def policy_app(serve_port, tiny_model_dir):
    from ray import serve

    from raydpo.policy.app import build_app
    from raydpo.policy.registry import REGISTRY_NAMESPACE, PolicyRegistry

    port = serve_port
    registry = ray.remote(num_cpus=0)(PolicyRegistry).options(name="test-policy-registry",
                                                              namespace=REGISTRY_NAMESPACE).remote()
    serve.run(build_app({"model_path": str(tiny_model_dir), "registry": "test-policy-registry", "num_cpus": 0.5,
                         "max_batch_size": 8}), name="policy", route_prefix="/policy")
    yield f"http://127.0.0.1:{port}/policy/v1", registry
    serve.delete("policy")
    ray.kill(registry)


def transformers_greedy(model_dir, state, tokenizer, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:])


def test_openai_client_and_a_published_update(policy_app, tiny_model_dir, tiny_tokenizer):
    url, registry = policy_app
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["policy"]

    before = client.completions.create(model="policy", prompt=PROMPT, max_tokens=8, temperature=0.0)
    assert before.system_fingerprint == "raydpo-policy-v0"
    assert before.choices[0].text == transformers_greedy(tiny_model_dir, None, tiny_tokenizer, PROMPT, 8)
    chat = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "apple"}],
                                          max_tokens=6, temperature=0.7, n=2)
    assert chat.object == "chat.completion" and len(chat.choices) == 2
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0

    # new weights: the base plus noise of std 0.2 (the untrained base, init std 0.02, says "\n"
    # to everything; these weights do not); published through the registry
    from raydpo.weights import read_safetensors

    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in read_safetensors(tiny_model_dir).items()}
    from raydpo.weights import buckets, put_weights

    stored = put_weights(buckets(state.items(), 64 << 10))  # buckets of 64 KiB: the replica reads ~30 in turn
    assert len(stored.parts) > 10
    from raydpo.policy.endpoint import PolicyEndpoint

    endpoint = PolicyEndpoint.__new__(PolicyEndpoint)  # the publishing half only: the app is already up
    endpoint.registry, endpoint.replicas = registry, 1
    assert endpoint.publish(1, weights=stored, timeout_s=60, wait=False) < 60  # as the loop publishes
    endpoint.settle(60)  # the replica serves it: the next publish, or the run's end, waits for this
    after = client.completions.create(model="policy", prompt=PROMPT, max_tokens=8, temperature=0.0)
    assert after.system_fingerprint == "raydpo-policy-v1"
    expected = transformers_greedy(tiny_model_dir, state, tiny_tokenizer, PROMPT, 8)
    assert after.choices[0].text == expected != before.choices[0].text
    raw = httpx.post(f"{url}/completions", json={"model": "policy", "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert raw.headers["x-raydpo-policy-version"] == "1"


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "policy"}, 400, "prompt: Field required"),
    ({"model": "policy", "prompt": 5}, 400, "prompt"),
    ({"model": "policy", "prompt": ""}, 400, "prompt[0]: must be 1 to"),
    ({"model": "policy", "prompt": ["a"] * 65}, 400, "give 1 to 64 prompts"),
    ({"model": "policy", "prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ({"model": "policy", "prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"model": "policy", "prompt": "x", "max_tokens": 100000}, 400, "exceed the context length"),
    ({"model": "policy", "prompt": "x", "stream": True}, 400, "stream=true is not supported"),
    ({"model": "policy", "prompt": "x", "n": 2, "temperature": 0}, 400, "n must be 1 when using greedy"),
    ({"model": "policy", "prompt": "x", "bogus": 1}, 400, "bogus: Extra inputs are not permitted"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model 'gpt-9' does not exist"),
])
def test_bad_completion_requests_are_4xx_and_the_service_keeps_answering(policy_app, body, status, needle):
    url, _ = policy_app
    r = httpx.post(f"{url}/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    ok = httpx.post(f"{url}/completions", json={"model": "policy", "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_bad_chat_and_oversized_bodies(policy_app):
    url, _ = policy_app
    r = httpx.post(f"{url}/chat/completions", json={"model": "policy", "messages": [{"role": "robot", "content": "x"}]},
                   timeout=60)
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/chat/completions", json={"model": "policy", "messages": []}, timeout=60)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/completions", content=b'{"model": "policy", "prompt": "' + b"a" * (2 << 20) + b'"}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400
    assert httpx.get(f"{url}/models", timeout=60).status_code == 200


def test_a_new_owner_of_the_registry_never_counts_an_earlier_runs_acks():
    """On a long-lived cluster a resumed (or new) run takes over the detached registry: replicas
    of the earlier run that still serve its version 12 must not make version 3 look served."""
    from raydpo.policy.registry import PolicyRegistry

    reg = PolicyRegistry()
    old = reg.current()[0]
    reg.publish(12, [None, "/ckpt/12"])
    reg.ack("old-replica", old, 12)
    reg.reset()
    epoch, version, payload = reg.current()
    assert epoch != old and version == 0 and payload is None and reg.serving() == {}
    reg.publish(3, [None, "/ckpt/3"])
    reg.ack("old-replica", old, 12)  # still up, still acking the earlier run's version
    assert reg.serving() == {}
    reg.ack("new-replica", epoch, 3)
    assert reg.serving() == {"new-replica": 3}
    # a replica whose load of this owner's version failed still reports why (the publisher
    # names it on timeout), though its ack is not counted as serving
    reg.ack("other-replica", old, 12, "SamplerError: checkpoint folder '/ckpt/3' does not exist on this node")
    assert reg.serving() == {"new-replica": 3} and "does not exist" in reg.update_errors()["other-replica"]


def test_the_remote_judge_runs_against_this_endpoint_through_faults(policy_app):
    """raydpo's own policy endpoint as the remote judge's OpenAI-compatible server (the other
    server it is tested against is `vllm serve`, tests/test_remote_judge.py)."""
    import asyncio

    from raydpo.judge.remote import RemoteJudgeCore, RemoteSettings
    from tests.helpers.fault_proxy import Faults, FaultProxy

    url, _ = policy_app
    upstream = url.removesuffix("/v1")
    items = [(PROMPT, f" apple {i} please", f" stone {i}") for i in range(6)]
    with FaultProxy(upstream, Faults(p429=0.2, p500=0.1, retry_after="0.01"), seed=2) as proxy:
        for api in ("completions", "chat"):
            s = RemoteSettings(base_url=proxy.url + "/v1", model="policy", api=api, api_key_env=None,
                               template="{prompt}{response_a}{response_b}", max_new_tokens=3, backoff_s=0.01,
                               max_retries=10)

            async def run():
                core = RemoteJudgeCore(s, None)
                return await asyncio.gather(*(core.compare(*it) for it in items)), core

            before = len(proxy.log)
            verdicts, core = asyncio.run(run())
            assert all(len(v.parsed) == 2 and v.calls == 2 for v in verdicts), verdicts
            faults = sum(e.fault != "ok" for e in proxy.log[before:])
            assert core.counts["retries"] == faults and core.counts["cache_misses"] == 12
            assert all(v.prompt_tokens > 0 and v.completion_tokens > 0 for v in verdicts)  # the endpoint's usage
    assert proxy.count("429") + proxy.count("500") > 0
