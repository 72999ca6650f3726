"""lens.py: the grid's rows are the internal policies of Hugging Face's own hidden states; the CLI draws
both conventions."""
import json

import torch

import lens
from conftest import FakeTok, tiny_model


def test_grid_rows_are_the_policies_of_hf_hidden_states():
    """Row l < L: lm_head(hidden_states[l]) (raw) or lm_head(norm(...)) (logit lens); row L: the model's own logits."""
    model = tiny_model("qwen3")
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(4, 9)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    L = model.config.num_hidden_layers
    for final_norm in (False, True):
        top, ent = lens.lens_grid(model, ids, pos, final_norm)
        assert top.shape == ent.shape == (L + 1, len(pos))
        for l in range(L):
            h = out.hidden_states[l][0, pos]
            logits = model.lm_head(model.model.norm(h) if final_norm else h)
            assert torch.equal(top[l], logits.argmax(-1))
            assert torch.allclose(ent[l], -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), atol=1e-4)
        assert torch.equal(top[L], out.logits[0, pos].argmax(-1))


def test_cli_draws_both_conventions(tmp_path, monkeypatch):
    monkeypatch.setattr(lens, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(lens, "model_config", lambda *a: tiny_model("llama").config)
    lens.main(["--question", "What is 1 + 2?", "--max-new-tokens", "5", "--out", str(tmp_path / "lens")])
    rec = json.load(open(tmp_path / "lens" / "lens.json"))
    assert (tmp_path / "lens" / "lens.png").exists() and len(rec["raw"]["top"]) == rec["layers"] + 1
    assert rec["raw"]["top"][-1] == rec["final_norm"]["top"][-1]  # the output policy is the same in both panels
    assert rec["raw"]["entropy"][1] != rec["final_norm"]["entropy"][1]
