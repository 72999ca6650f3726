"""entropy.py: analytic entropies, the streamed analysis against a direct one, the EIC rule."""
import json
import math

import pytest
import torch

import entropy as E
from conftest import tiny_model
from decompose import decompose, entropy, unembed


def test_entropy_analytic():
    V = 1000
    assert entropy(torch.zeros(V)).item() == pytest.approx(math.log(V), rel=1e-6)
    one_hot = torch.full((V,), float("-inf"))
    one_hot[3] = 0.0
    assert entropy(one_hot).item() == 0.0
    two = torch.tensor([0.0, 0.0, float("-inf"), float("-inf")])
    assert entropy(two).item() == pytest.approx(math.log(2))
    bf = torch.randn(4, 50).to(torch.bfloat16)
    h = entropy(bf)
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    torch.testing.assert_close(h, entropy(bf.float()))
    assert torch.isfinite(entropy(torch.tensor([[1e4, -1e4, float("-inf")]]))).all()


def direct(model, ids, resp, mask, final_norm):
    """Unstreamed reference: decompose, unembed every quantity in full, average over response positions."""
    L = model.config.num_hidden_layers
    pos = torch.zeros_like(resp, dtype=torch.bool)
    pos[:, :-1] = resp[:, 1:].bool()
    H = lambda x, fn=final_norm: entropy(unembed(model, x, fn))[pos].mean().item()
    d = decompose(model, ids, mask)
    store = {"attn_in": [], "ffn_in": []}
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, o: store["attn_in"].append(o))
             for layer in model.model.layers]
    hooks += [layer.mlp.register_forward_pre_hook(lambda m, a: store["ffn_in"].append(a[0]))
              for layer in model.model.layers]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return {"layer": [H(d.hidden(l), final_norm or l == L) for l in range(L + 1)],
            "attn_in": [H(x) for x in store["attn_in"]], "attn_out": [H(x) for x in d.attn],
            "ffn_in": [H(x) for x in store["ffn_in"]], "ffn_out": [H(x) for x in d.ffn]}


@pytest.mark.parametrize("final_norm", [False, True])
def test_streamed_equals_direct(arch, final_norm, monkeypatch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0  # right padding
    resp = torch.zeros_like(ids)
    resp[:, 9:] = 1
    resp[2, 12:] = 0
    calls = []
    real = E.unembed
    monkeypatch.setattr(E, "unembed", lambda m, x, fn: calls.append(x.shape[0]) or real(m, x, fn))
    monkeypatch.setattr(E, "CHUNK_BUDGET", 4 * 97 * 4)  # 4 rows of float32 logits at a time
    got = E.internal_entropy(model, ids, resp, final_norm=final_norm, attention_mask=mask)
    want = direct(model, ids, resp, mask, final_norm)
    for k, v in want.items():
        torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(v), atol=1e-5, rtol=1e-5)
    assert got["dH_ffn"] == [o - i for o, i in zip(got["ffn_out"], got["ffn_in"])]
    assert max(calls) <= 4  # streamed: never more than one chunk of logits at once


def test_response_mask_is_respected():
    """Only positions predicting a response token count: changing a token never read by them changes nothing."""
    model = tiny_model("qwen3")
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    last = torch.zeros_like(ids)
    last[:, 11:] = 1  # scores position 10 only, the policy that produced token 11
    x = E.internal_entropy(model, ids, last)
    y = E.internal_entropy(model, torch.cat([ids[:, :11], (ids[:, 11:] + 5) % 97], 1), last)
    for k in x:
        torch.testing.assert_close(torch.tensor(x[k]), torch.tensor(y[k]))
    wider = torch.zeros_like(ids)
    wider[:, 8:] = 1
    assert E.internal_entropy(model, ids, wider)["layer"] != x["layer"]


def test_bad_masks():
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 6))
    with pytest.raises(ValueError, match="response_mask shape"):
        E.internal_entropy(model, ids, torch.ones(1, 5))
    with pytest.raises(ValueError, match="no token"):
        E.internal_entropy(model, ids, torch.zeros(1, 6))


def test_eic_stages_rule():
    s = E.eic_stages([0.5, 0.4, 0.02, -0.01, 0.03, -0.6, -0.8])
    assert s == {"exploration": [0, 1], "integration": [2, 4], "convergence": [5, 6], "boundary_layer": 1,
                 "suggested_layer": 1}
    s = E.eic_stages([0.01, 0.02, -0.01, -2.0, -3.0])  # Llama-like: weak rises, then abrupt convergence
    assert (s["exploration"] == [0, 1] and s["convergence"] == [3, 4] and s["suggested_layer"] == 1
            and s["boundary_layer"] == 1)
    s = E.eic_stages([-0.01, 0.02, -0.01, -2.0, -3.0])  # no rise at the bottom: no boundary
    assert s["exploration"] is None and s["boundary_layer"] is None
    s = E.eic_stages([1.0, 1.0, 1.0, 1.0])  # all exploring: k stays an internal layer
    assert s["exploration"] == [0, 3] and s["suggested_layer"] == 2


def test_boundary_layer_is_the_end_of_the_first_exploring_run():
    """The paper's rule (Sec. 5.3): the last FFN of the run that raises the entropy from layer 0, before the first
    that does not; a later rise does not count (the cumulative peak of the old rule would take layer 3 here)."""
    dh = [0.5, -0.3, 0.6, 0.2, -0.9]
    assert E.boundary_layer(dh) == 0 and E.eic_stages(dh)["suggested_layer"] == 0
    assert E.boundary_layer([0.3, 0.2, 0.01, -0.4]) == 1  # 0.01 is below 10% of the largest change: integration
    assert E.boundary_layer([-0.2, 0.5, -0.1]) is None  # no exploration stage at the bottom
    assert E.eic_stages([-0.2, 0.5, 0.4, -0.1])["suggested_layer"] == 2  # then the cumulative peak decides
    assert E.boundary_layer([0.0] * 5) is None


def test_boundary_layer_on_qwen_and_llama_like_profiles():
    """Issue 30.7: Qwen3-4B's FFNs explore in layers 1-6, integrate (~0) in 7-26 and converge above (Fig. 3): k = 5;
    Llama's rise weakly up to an abrupt collapse in the last layers: the last rising layer (the authors' k = 26 for
    Llama-8B). The old tolerance (10% of the largest |dH|, i.e. of the collapse) gave None and pi_0 here."""
    qwen = [0.9, 0.6, 1.2, 0.8, 0.5, 0.7] + [0.03, -0.02] * 10 + [-0.4] * 10  # 36 layers
    assert E.boundary_layer(qwen) == 5 and E.eic_stages(qwen)["suggested_layer"] == 5
    llama = [0.3] * 27 + [-0.2] * 3 + [-1.0, -3.0]  # 32 layers
    assert E.boundary_layer(llama) == 26 and E.eic_stages(llama)["suggested_layer"] == 26
    assert E.boundary_layer([0.3] * 10 + [-1.0, -3.0]) == 9


def test_layer_auto_refuses_a_model_without_boundary(monkeypatch):
    """--layer auto never trains pi_0 silently: no exploration stage is an error naming the flag."""
    import bupo
    from cli import InputError
    from config import BuPOConfig
    monkeypatch.setattr(bupo, "entropy_profile", lambda model, tok, cfg: {"dH_ffn": [-0.5, -0.2, 0.1, -2.0]})
    with pytest.raises(InputError, match="no boundary layer.*--layer k"):
        bupo.resolve_layer(BuPOConfig(layer=None), None, None)
    monkeypatch.setattr(bupo, "entropy_profile",
                        lambda model, tok, cfg: {"dH_ffn": [0.3] * 27 + [-0.2] * 3 + [-1.0, -3.0]})
    assert bupo.resolve_layer(BuPOConfig(layer=None), None, None) == 26


def test_family_comparison_resumes_without_recomputing(tmp_path, monkeypatch):
    """`--model a,b --compare-norm` analyses each model in both conventions; a rerun reads the finished
    analyses back from summary.json (no entropy pass) and redraws the same comparison."""
    import entropy
    from conftest import fake_load, tiny_model
    dirs = []
    for arch in ("llama", "gemma3_text"):
        tiny_model(arch).save_pretrained(tmp_path / arch)
        dirs.append(str(tmp_path / arch))
    monkeypatch.setattr(entropy, "load_model", fake_load)
    argv = ["--model", ",".join(dirs), "--data", "arithmetic", "--n", "3", "--max-new-tokens", "5", "--compare-norm",
            "--out", str(tmp_path / "cmp")]
    entropy.main(argv)
    first = {a: json.load(open(tmp_path / "cmp" / a / "summary.json")) for a in ("llama", "gemma3_text")}
    assert {k for s in first.values() for k in s} >= {"raw", "final_norm"}
    assert first["llama"]["raw"]["entropy"] != first["llama"]["final_norm"]["entropy"]
    assert all((tmp_path / "cmp" / a / "flow.png").exists() for a in ("llama", "gemma3_text"))  # Fig. 2 and Fig. 12
    # convention-free
    assert first["llama"]["raw"]["entropy"]["cos_ffn"] == first["llama"]["final_norm"]["entropy"]["cos_ffn"]

    def no_pass(*a, **k):
        raise AssertionError("a finished analysis was computed again")
    monkeypatch.setattr(entropy, "analyse", no_pass)
    (tmp_path / "cmp" / "families.png").unlink()
    entropy.main(argv)
    assert (tmp_path / "cmp" / "families.png").exists()
    assert {a: json.load(open(tmp_path / "cmp" / a / "summary.json")) for a in ("llama", "gemma3_text")} == first


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_residual_cosines_against_the_decomposition(arch):
    """Fig. 12's cos(A_l, h_l) and cos(F_l, h_l + A_l), token means over the response, from decompose()'s
    h_0, A_l, F_l."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (2, 9), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[0, 4:], resp[1, 6:] = True, True
    got = E.internal_entropy(model, ids, resp)
    dec = decompose(model, ids)
    pos = torch.zeros_like(resp)
    pos[:, :-1] = resp[:, 1:]  # positions that produce a response token
    for l in range(model.config.num_hidden_layers):
        h = dec.hidden(l)
        ca = torch.cosine_similarity(dec.attn[l], h, dim=-1)[pos].mean().item()
        cf = torch.cosine_similarity(dec.ffn[l], h + dec.attn[l], dim=-1)[pos].mean().item()
        assert got["cos_attn"][l] == pytest.approx(ca, abs=1e-5) and got["cos_ffn"][l] == pytest.approx(cf, abs=1e-5)


def test_flow_points_run_through_each_module():
    """Fig. 2's line: H(h_0), then per layer H(A_l), H(F_l), H(h_{l+1}), at l + 1/3, l + 2/3, l + 1."""
    res = {"layer": [8.0, 5.0, 1.0], "attn_out": [7.0, 4.0], "ffn_out": [6.0, 3.0], "dH_ffn": [0.0, 0.0]}
    xs, hs = E.flow_points(res)
    assert hs == [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 1.0]
    assert xs == pytest.approx([0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
