"""Worker for tests/test_fsdp_cpu.py: 2 ranks on CPU (gloo), each model sharded with FSDP2's `fully_shard`.

For each pruning setting, an unsharded copy (the reference, on every rank) and an FSDP2-sharded copy
train in lockstep with AdamW; the sharded Pruner works on this rank's shards only. Each rank writes
what it saw to OUT/rank<r>.json: whether its gathered masks, weights and sparsity equal the reference's
after every step, whether pruned weights stayed exactly zero, and whether a checkpoint (full tensors)
written by the sharded pruner reloads into a fresh sharded one.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hf_compress.pruning import Pruner
from helpers import tiny_bert

SETTINGS = [("magnitude", "unstructured", "global"), ("movement", "unstructured", "global"),
            ("taylor", "unstructured", "local"), ("magnitude", "n:m", "global"), ("taylor", "heads", "global"),
            ("taylor", "neurons", "local")]


def shard(model, mesh):
    for block in model.bert.encoder.layer:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    x = torch.randint(5, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    report = {}
    for method, granularity, scope in SETTINGS:
        torch.manual_seed(0)
        base = tiny_bert(layers=2, hidden=32, ffn=64).eval()  # eval: no dropout, so both copies see the same gradients
        ref, sharded = copy.deepcopy(base), shard(copy.deepcopy(base), mesh)
        pr = Pruner(ref, method, granularity, scope)
        ps = Pruner(sharded, method, granularity, scope)
        sharded_weights = [type(w).__name__ for w in ps.weights]
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (ref, sharded)]
        steps = []
        for step in range(5):
            for model, p, opt in ((ref, pr, opts[0]), (sharded, ps, opts[1])):
                model(input_ids=x).logits.pow(2).mean().backward()
                p.accumulate()
                if step in (1, 3):
                    p.update(0.25 * (step + 1) / 2)  # 0.25, then 0.5
                p.mask_grads()
                opt.step()
                p.apply()
                opt.zero_grad()
            masks = ps.gather(ps.masks)
            weights = ps.gather([w.detach() for w in ps._local()])
            steps.append({
                "masks_equal": all(torch.equal(a.bool(), b.bool()) for a, b in zip(masks, pr.masks)),
                "weights_close": max(float((a - b.detach()).abs().max()) for a, b in zip(weights, pr.weights)),
                "sparsity": [pr.sparsity(), ps.sparsity()],
                "zeros_kept": all(bool((w[m == 0] == 0).all()) for w, m in zip(weights, masks)),
            })
        state = ps.state_dict()  # full tensors, gathered: every rank calls it
        fresh = Pruner(shard(copy.deepcopy(base), mesh), method, granularity, scope)
        fresh.load_state_dict(state)
        report[f"{method}/{granularity}/{scope}"] = {
            "weight_types": sorted(set(sharded_weights)),
            "local_shape": list(ps.masks[0].shape), "full_shape": list(ps.weights[0].shape),
            "steps": steps,
            "state_equals_reference": all(torch.equal(state[k], v) for k, v in pr.state_dict().items()),
            "reload_equal": all(torch.equal(a, b) for a, b in zip(fresh.masks, ps.masks)),
        }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)
    with open(f"{out}/rank{rank}_convert.json", "w") as f:
        json.dump(finish_qat_and_structured(mesh, x), f)
    dist.destroy_process_group()


def finish_qat_and_structured(mesh, x) -> dict:
    """Heads pruning + int8 QAT trained sharded and unsharded in lockstep; then each is converted to what
    ships: the unsharded one in place, the sharded one by gathering its full state into an unsharded copy."""
    from hf_compress import PruningConfig, QATConfig, pruning, quantization
    from hf_compress.sharding import full_state_dict

    pcfg = PruningConfig(granularity="heads", method="magnitude", target_sparsity=0.5)
    qcfg = QATConfig(weight_bits=8, export="torch-int8")
    torch.manual_seed(0)
    base = tiny_bert(layers=2, hidden=32, ffn=64).eval()
    ref, sharded = copy.deepcopy(base), shard(copy.deepcopy(base), mesh)
    runs = []
    for model in (ref, sharded):
        p = pruning.prepare(model, pcfg)
        quantization.prepare(model, qcfg)
        runs.append((model, p, torch.optim.AdamW(model.parameters(), lr=1e-2)))
    for step in range(4):
        for model, p, opt in runs:
            model(input_ids=x).logits.pow(2).mean().backward()
            if step == 1:
                p.update(0.5)
            p.mask_grads()
            opt.step()
            p.apply()
            opt.zero_grad()
    try:
        quantization.convert(sharded, qcfg)
        refused = ""
    except ValueError as e:
        refused = str(e)
    full = full_state_dict(sharded)  # collective: every rank gets the whole tensors
    copy_ = copy.deepcopy(base)
    quantization.prepare(copy_, qcfg)
    copy_.load_state_dict(full)
    out = {}
    for name, model in (("ref", ref), ("gathered", copy_)):
        removed = pruning.convert(model, pcfg)
        quantization.convert(model, qcfg)
        out[name] = {"removed": removed, "meta": model.config.hf_compress,
                     "logits": model(input_ids=x).logits.tolist(),
                     "shapes": {k: list(v.shape) for k, v in model.state_dict().items()}}
    out["refused"] = refused
    return out


if __name__ == "__main__":
    main(sys.argv[1])
