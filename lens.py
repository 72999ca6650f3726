"""A logit-lens grid of one answer: for every answer token and every layer, the top token of pi_l and its entropy.

Beyond the paper (Tan et al., arXiv 2512.19673, Sec. 1-2, whose internal policies it draws
one token at a time): the model answers a question greedily, then every residual h_l
(l = 0: the embedding, ..., L: the output) at the positions that produce the answer is
unembedded, as the original logit-lens pictures do. Two panels: the paper's raw residual
(lm_head(h_l)) and the logit lens (lm_head(norm(h_l))); the last row of both is the
model's own output policy. A cell shows the top token, its colour the entropy of pi_l.

    python lens.py --question "What is 12 + 7?"          # a few seconds on CPU
    python lens.py --model gemma3-270m --question "Name a prime number." --max-new-tokens 12
"""
import argparse
import json
import os

import matplotlib
import torch

from cli import check, claim_run_dir, run_main
from decompose import capture, entropy, unembed
from models import EMBEDDED, load_model, model_config
from problems import prompt_ids
from rollout import generate

matplotlib.use("Agg")  # figures to files, no display
import matplotlib.pyplot as plt  # noqa: E402


@torch.no_grad()
def lens_grid(model, ids, positions, final_norm):
    """(top token ids, entropies), each (L+1, P): pi_l at `positions` of ids (1, T) for l = 0..L; row L is the output
    policy."""
    L = model.config.num_hidden_layers
    rows = [None] * (L + 1)

    def on(kind, l, x):
        if kind == "embed":
            rows[0] = x[0, positions]
        elif kind == "layer":
            rows[l + 1] = x[0, positions]  # (P, D)
    with capture(model, on):
        model.model(input_ids=ids, use_cache=False)
    # the last one: the output policy
    logits = [unembed(model, h, final_norm or l == L).float() for l, h in enumerate(rows)]
    return torch.stack([z.argmax(-1) for z in logits]), torch.stack([entropy(z) for z in logits])


def draw(path, panels, tokens, title):
    """panels: {name: (top token strings (L+1, P), entropies (L+1, P))}; one heat map per panel, layers bottom to
    top."""
    P = len(tokens)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 0.75 * P) * len(panels), 9), squeeze=False)
    for ax, (name, (tops, ent)) in zip(axes[0], panels.items()):
        im = ax.imshow(ent, origin="lower", aspect="auto", cmap="viridis")
        for l in range(ent.shape[0]):
            for p in range(P):
                ax.text(p, l, tops[l][p][:8], ha="center", va="center", fontsize=5,
                        color="w" if ent[l, p] < ent.max() / 2 else "k")
        ax.set_xticks(range(P), [t[:10] for t in tokens], rotation=60, fontsize=7)
        ax.set(title=name, xlabel="the token produced (the answer)", ylabel="layer l (0 = embedding, top = output)")
        fig.colorbar(im, ax=ax, label="entropy of pi_l (nats)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Logit-lens grid of one greedy answer, both conventions "
                                            "(beyond BuPO, arXiv 2512.19673).")
    p.add_argument("--model", default=None,
                   help=f"HF checkpoint dir, hub id or short name ({', '.join(EMBEDDED)}; default: smollm2)")
    p.add_argument("--question", default="What is 12 + 7?", help="the user turn; the answer is the model's greedy one")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (the grid's width)")
    p.add_argument("--out", default="runs/lens", help="output dir: lens.png, lens.json")
    p.add_argument("--overwrite", action="store_true", help="empty --out first (it holds another grid)")
    args = p.parse_args(argv)
    check(1 <= args.max_new_tokens <= 64,
          f"--max-new-tokens must lie in 1..64 (one column per token), got {args.max_new_tokens}")
    check(args.question.strip() != "", "--question is empty: give the user turn to answer")
    config = model_config(args.model)  # a bad --model fails here, before any work
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}
    with claim_run_dir(args.out, settings, resume=True, overwrite=args.overwrite):
        model, tok = load_model(args.model)
        prompt = prompt_ids(tok, [{"messages": [{"role": "user", "content": args.question}]}])[0]
        check(len(prompt) + args.max_new_tokens <= config.max_position_embeddings,
              "the question plus --max-new-tokens exceeds the context")
        r = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=0.0,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answer = r.tokens[0, :r.lengths[0]].tolist()
        ids = torch.tensor([prompt + answer], device=model.device)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))  # position t produces token t+1
        panels, record = {}, {"question": args.question, "answer": tok.decode(answer),
                              "layers": config.num_hidden_layers}
        for final_norm, name in ((False, "raw residual lm_head(h_l) (the paper's)"),
                                 (True, "logit lens lm_head(norm(h_l))")):
            top, ent = lens_grid(model, ids, positions, final_norm)
            panels[name] = ([[tok.decode([t]) for t in row] for row in top.tolist()], ent.cpu().numpy())
            record["final_norm" if final_norm else "raw"] = {"top": panels[name][0], "entropy": ent.tolist()}
        draw(os.path.join(args.out, "lens.png"), panels, [tok.decode([t]) for t in answer],
             f"{args.question!r} -> {record['answer']!r}")
        with open(os.path.join(args.out, "lens.json"), "w") as f:
            json.dump(record, f, indent=1)
    print(f"answer: {record['answer']!r}\nwrote {args.out}/lens.png, lens.json")


if __name__ == "__main__":
    run_main(main)
