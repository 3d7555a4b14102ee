"""Which weights does each pruning score cut first, on an already fine-tuned model? (issue 16, movement)

At 750 steps, 90% unstructured pruning with `method="movement"` collapsed the fine-tuned SST-2 teacher to the
majority class, where magnitude kept 79.7% (BENCHMARKS.md, pruning at 750 steps). This script looks at the
first mask update of that run's schedule: the scores after `--batches` batches of gradients on the fine-tuned
teacher (the protocol's first update is at step 15), the weights the first cut removes (8.7% of them: the cubic
schedule's value at step 15 of 450 for a 90% target), and where those weights sit in the |w| ranking.

The gradient is the protocol's at its start: the student is the teacher, so the KD term (alpha = 0.9) has zero
gradient and only 0.1 x cross-entropy is left. The weights do not move between batches here (no optimizer step),
which is what the scores see during the first few steps up to the learning rate's effect. Scores use
`hf_compress.pruning.scores` (the code PruningCallback runs).

    OMP_NUM_THREADS=1 python bench/bench_first_cut.py          # ~1 min -> bench/results/first_cut.json
    python bench/bench_first_cut.py --quick                    # proves it runs; numbers meaningless
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import SEED, parse_args, sst2, teacher, tokenizer, write  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from hf_compress.pruning import scores as S  # noqa: E402
from hf_compress.pruning.schedules import sparsity_at  # noqa: E402


def main(argv=None):
    a = parse_args(__doc__.splitlines()[0], argv)
    sizes = a.sizes
    n_batches, batch, hard_weight = (3 if a.quick else 15), 32, 0.1
    first_cut = sparsity_at(15, 0.9, 0, 450, frequency=15)  # the protocol's first update (90%, cubic to step 450)
    torch.manual_seed(SEED)
    tok = tokenizer()
    model = teacher(sizes, tok)  # the fine-tuned teacher every protocol pruning run starts from
    model.train()
    train_ds, _ = sst2(tok, sizes["train"], sizes["eval_rows"])
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    weights = [model.get_submodule(n).weight for n in names]
    acc = {m: S.init_scores(weights, m, names) for m in ("movement", "taylor")}
    collate = DataCollatorWithPadding(tok)
    cols = ("input_ids", "attention_mask", "token_type_ids", "label")
    for b in range(n_batches):
        rows = [{c: train_ds[i][c] for c in cols if c in train_ds.column_names} for i in range(b * batch, (b + 1) * batch)]
        inputs = collate(rows)
        model.zero_grad()
        (hard_weight * model(**inputs).loss).backward()
        for m, s in acc.items():
            S.accumulate(s, weights, m)
    magnitude = torch.cat([w.detach().abs().flatten() for w in weights])
    pct = magnitude.argsort().argsort().float() / magnitude.numel()  # each weight's |w| percentile
    k = int(round(first_cut * magnitude.numel()))
    rows = []
    for method in ("magnitude", "movement", "taylor"):
        score = torch.cat([s.flatten() for s in S.current(acc.get(method, []), weights, method)])
        cut = torch.topk(score, k, largest=False).indices
        rows.append(dict(method=method, cut_fraction=first_cut, cut_weights=k,
                         median_abs_w_percentile=pct[cut].median().item(),
                         share_in_larger_half=(pct[cut] > 0.5).float().mean().item(),
                         share_in_largest_tenth=(pct[cut] > 0.9).float().mean().item()))
        print(f"{method:9s}: first cut {k} weights ({first_cut:.1%}); median |w| percentile "
              f"{rows[-1]['median_abs_w_percentile']:.3f}, in the larger half {rows[-1]['share_in_larger_half']:.1%}, "
              f"in the largest tenth {rows[-1]['share_in_largest_tenth']:.1%}")
    write("first_cut", {"quick": a.quick, "batches": n_batches, "batch": batch, "loss": f"{hard_weight} x cross-entropy",
                        "model": "the protocol's fine-tuned MiniLM-L6 SST-2 teacher", "targets": "block Linears",
                        "scores": rows}, a.out)


if __name__ == "__main__":
    main()
