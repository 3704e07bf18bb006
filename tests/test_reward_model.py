"""The reward-model judge: Bradley-Terry loss by hand, a reward model trained by
jobs/train_reward.py on the trainer machinery, and that model served as a judge
whose HTTP scores equal a direct transformers forward pass."""

import json
import math

import pytest
import torch

from raydpo.train.step import bradley_terry_loss
from tests.helpers.proc import run_py
from tests.test_judge import post

P = "about: apple | max 5\n"


def test_bradley_terry_loss_by_hand():
    """r_c = r_r: ln 2 = 0.693147; r_c - r_r = 2: log(1 + e^-2) = 0.126928;
    r_c - r_r = -1: log(1 + e) = 1.313262. Mean of the three: 0.711112."""
    rc, rr = torch.tensor([0.5, 3.0, -1.0]), torch.tensor([0.5, 1.0, 0.0])
    loss, m = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(-2)) + math.log1p(math.e)) / 3, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3, abs=1e-6) and m["margin"].item() == pytest.approx(1 / 3, abs=1e-6)
    rc.requires_grad_(True)
    bradley_terry_loss(rc, rr)[0].backward()
    assert rc.grad[1].item() == pytest.approx(-torch.sigmoid(torch.tensor(-2.0)).item() / 3, abs=1e-6)


@pytest.fixture(scope="module")
def trained_reward_model(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rm")
    r = run_py(["jobs/train_reward.py", f"run_dir={run_dir}", "trainer.max_steps=80", "trainer.lr=1e-3",
                "cluster.num_cpus=2"], timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return run_dir


@pytest.mark.slow
def test_reward_model_learns_the_preferences(trained_reward_model):
    ev = json.loads((trained_reward_model / "reward_eval.json").read_text())
    # held-out prompts, chance is 0.5: the judge's preferences are learnt, not memorised
    assert ev["pairs"] == 256 and ev["accuracy"] >= 0.75, ev
    rows = [json.loads(line) for line in open(trained_reward_model / "metrics.jsonl")]
    losses = [x["reward/loss"] for x in rows]
    assert losses[0] == pytest.approx(math.log(2), abs=0.15) and sum(losses[-10:]) / 10 < 0.5


@pytest.mark.slow
def test_reward_model_served_as_a_judge(serve_port, trained_reward_model):
    from ray import serve
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raydpo.judge.apps import build_app

    ckpt = str(next((trained_reward_model / "ray_train" / "reward").glob("reward-step-*")))
    port = serve_port
    serve.run(build_app({"reward_model": ckpt, "num_cpus": 0.5}), name="rm", route_prefix="/rm")
    url = f"http://127.0.0.1:{port}/rm"
    responses = [" apple is red please.", " stone", " apple thanks a b c d e f g h."]
    status, out = post(f"{url}/v1/score", {"items": [{"prompt": P, "response": r} for r in responses]})
    assert status == 200 and out["judge"].startswith("reward_model:")
    # second implementation: plain transformers on prompt ids + (response + EOS) ids
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    for r, got in zip(responses, out["scores"]):
        ids = tok(P, add_special_tokens=False)["input_ids"] + tok(r + tok.eos_token, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert got == pytest.approx(want, abs=1e-4)
    status, cmp = post(f"{url}/v1/compare", {"items": [{"prompt": P, "response_a": responses[0],
                                                          "response_b": responses[1]}]})
    assert status == 200
    expected = "a" if out["scores"][0] > out["scores"][1] else "b"
    assert cmp["results"][0]["preferred"] == expected
    assert cmp["results"][0]["margin"] == pytest.approx(out["scores"][0] - out["scores"][1], abs=1e-4)
    status, err = post(f"{url}/v1/score", {"items": [{"prompt": P}]})
    assert status == 422 and "items.0.response: Field required" in err["error"]
    serve.delete("rm")
