"""probe.py: Fig. 5's cosines, entropy change, perplexity and KL against Hugging Face's forward pass; one probe set for
every method and seed of an experiment, and its report."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import bupo
import experiment
import probe as probe_module
from conftest import FakeTok, tiny_model
from decompose import decompose
from policy import pad_rows
from probe import probe, probe_set
from test_experiment import tiny_experiment

PROBES = {"prompts": [[1, 5, 6, 7], [1, 9, 10], [1, 11]], "responses": [[12, 13, 14], [15], [16, 17, 18, 19]]}


def reference(model, k):
    """The four measures from HF's hidden states (raw for layers < L-1; the top raw residual as the sum of the
    stream)."""
    L = model.config.num_hidden_layers
    ids, att, resp = pad_rows(PROBES["prompts"], PROBES["responses"], 0)
    with torch.no_grad():
        out = model(ids, attention_mask=att, output_hidden_states=True)
        d = decompose(model, ids, att)
    hs = list(out.hidden_states[:L]) + [d.embed + d.attn.sum(0) + d.ffn.sum(0)]  # h_{-1} (embedding), h_0, ..., h_{L-1}
    pos = torch.zeros_like(resp)
    pos[:, :-1] = resp[:, 1:]
    h = lambda l: hs[l + 1][pos]
    logits = lambda l: model.lm_head(model.model.norm(h(l)) if l == L - 1 else h(l))
    if getattr(model.config, "final_logit_softcapping", None):
        cap = model.config.final_logit_softcapping
        logits = (lambda f: lambda l: torch.tanh(f(l) / cap) * cap)(logits)
    ent = lambda l: -(logits(l).softmax(-1) * logits(l).log_softmax(-1)).sum(-1).mean()
    later = range(k + 1, L)
    kl = [F.kl_div(logits(j).log_softmax(-1), logits(k).log_softmax(-1), log_target=True,
                   reduction="none").sum(-1).mean() for j in later]
    nll = F.cross_entropy(out.logits[:, :-1][pos[:, :-1]], ids[:, 1:][pos[:, :-1]])
    return {"cos": [F.cosine_similarity(h(k), h(j), dim=-1).mean().item() for j in later],
            "dH": (ent(k) - ent(k - 1)).item(), "ppl": math.exp(nll.item()), "kl": [x.item() for x in kl]}


@pytest.mark.parametrize("arch,k", [("llama", 1), ("llama", 0), ("qwen3", 2), ("gemma3_text", 1)])
def test_probe_matches_hugging_face(arch, k):
    extra = (dict(layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=5.0)
             if arch == "gemma3_text" else {})
    model = tiny_model(arch, num_hidden_layers=4, **extra)
    got, want = probe(model, PROBES, k), reference(model, k)
    assert len(got["cos"]) == len(got["kl"]) == 4 - k - 1
    for key in ("cos", "kl"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    assert got["dH"] == pytest.approx(want["dH"], rel=1e-4, abs=1e-5)
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-4)
    assert got["kl"][-1] > 0 and all(-1 <= c <= 1 for c in got["cos"])


def test_probe_chunks_by_the_budget(monkeypatch):
    """One row per chunk gives the same measures as one chunk."""
    model = tiny_model("llama", num_hidden_layers=4)
    whole = probe(model, PROBES, 1)
    monkeypatch.setattr(probe_module, "CHUNK_BUDGET", 4 * model.config.vocab_size)
    chunked = probe(model, PROBES, 1)
    for key, v in whole.items():
        assert chunked[key] == pytest.approx(v, rel=1e-5), key


def test_probe_set_is_the_start_models_answers():
    model, tok = tiny_model("llama"), FakeTok()
    a, b = probe_set(model, tok, "arithmetic", 3, 5), probe_set(model, tok, "arithmetic", 3, 5)
    assert a == b and len(a["prompts"]) == 3 and all(1 <= len(r) <= 5 for r in a["responses"])


def test_one_probe_set_for_every_method_and_seed(tmp_path, monkeypatch):
    """The experiment samples the probe set once from the start model (initial.json) and every run of every method
    and seed probes exactly it; the report tables and draws the probes."""
    seen = []
    real = bupo.probe
    counted = lambda model, probes, k, pad_id=0: seen.append((json.dumps(probes), k)) or real(model, probes, k, pad_id)
    monkeypatch.setattr(bupo, "probe", counted)  # the runs' probes
    monkeypatch.setattr(experiment, "probe", counted)  # the start's
    cfg = tiny_experiment(tmp_path, monkeypatch, probe_every=1, probe_samples=2, seeds="2")
    experiment.experiment(cfg)
    out = tmp_path / "exp"
    start = json.load(open(out / "initial.json"))
    assert {s for s, _ in seen} == {json.dumps(start["probe_set"])} and {k for _, k in seen} == {1}
    assert len(seen) == 1 + 2 * 2 * 2  # the start, then 2 methods x 2 seeds x 2 steps
    hist = [json.loads(x) for x in open(out / "seed1" / "bupo" / "metrics.jsonl")]
    assert all(len(m["probe_cos"]) == 1 and m["probe_ppl"] > 1 and m["time_probe"] > 0 for m in hist)
    assert "probe of layer 1 (Fig. 5)" in (out / "results.md").read_text()
    assert (out / "probes.png").exists() and (out / "probe_layers.png").exists()
    res = json.load(open(out / "results.json"))["probes"]
    assert set(res) == {"BuPO", "GRPO"} and set(res["BuPO"]) == {"0", "1", "2"}
