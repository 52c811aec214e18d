"""Logits parity: recomputes, with the PyTorch reference, the logits that Kiln's engine wrote into a
fixture, and fails if any differs by more than the tolerance.

    python parity.py FIXTURE.json [--atol 1e-4] [--rtol 1e-4]

The fixture (written by the Rust test `tests/torch_reference.rs`) names the model directory and, per
sequence, each forward call's new tokens as (token, kind, a, b) rows (kind 0: text position a; kind
1: image row a, column b) with the logits Kiln computed for the call's last token. Prints one JSON
line: calls checked, the largest absolute and relative differences, and whether every call's most
likely code agrees.
"""

import argparse
import json
import sys

import torch

from kiln_torch import Model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fixture")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fixture = json.loads(open(args.fixture).read())
    model = Model(fixture["model_dir"])
    calls = worst_abs = worst_rel = 0.0
    argmax_agrees = True
    failures = []
    for s, seq in enumerate(fixture["sequences"]):
        cache = model.new_cache()
        for c, call in enumerate(seq["calls"]):
            ours = model.forward_sequence(call["tokens"], cache)[0].double()
            kiln = torch.tensor(call["logits"], dtype=torch.float64)
            diff = (ours - kiln).abs()
            worst_abs = max(worst_abs, diff.max().item())
            worst_rel = max(worst_rel, (diff / kiln.abs().clamp(min=1.0)).max().item())
            argmax_agrees &= bool(ours.argmax() == kiln.argmax())
            if not torch.allclose(ours, kiln, atol=args.atol, rtol=args.rtol):
                failures.append(f"sequence {s} call {c}: max |diff| {diff.max().item():.3g}")
            calls += 1
    print(json.dumps({"calls": int(calls), "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
                      "argmax_agrees": argmax_agrees, "failures": failures}))
    sys.exit(1 if failures or not argmax_agrees else 0)


if __name__ == "__main__":
    main()
