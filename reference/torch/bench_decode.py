"""The PyTorch side of `kiln bench --against-torch`: times decode steps of the reference model on
request, so that Kiln and PyTorch alternate in one run on one machine.

    python bench_decode.py --model DIR [--threads 2] [--mode eager|compile]

Reads one JSON request a line on stdin, `{"batch": B, "context": C, "steps": S}`, and answers one
JSON line, `{"step_ms": [...]}` (or `{"error": "..."}`): S decode steps of a batch of B sequences
that already hold C tokens (a real prefix run through the model, then image inputs), each step timed
alone. `compile` runs the step under `torch.compile` (full-length cache with a mask, so one graph
serves every position); its compilation happens in an untimed warm-up.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from kiln_torch import Model, rms_norm

PROMPT = "a red triangle above a blue star on a grey background"


def fixture_tokens(model, context):
    """A prefix of `context` tokens as Kiln's decode fixture lays it out: BOS, the prompt's bytes,
    width and height tokens at text positions, then image inputs at their patches."""
    cfg = model.cfg
    grid = max(cfg["sizes"]) // cfg["patch_size"]
    first_code = 258 + 2 * grid
    side = 128 // cfg["patch_size"]
    text = [256] + list(PROMPT.encode()) + [258 + side - 1, 258 + grid + side - 1]
    rows = [(t, 0, i, 0) for i, t in enumerate(text)]
    for i in range(context - len(rows)):
        token = 257 if i == 0 else first_code + (i * 37) % cfg["codebook_size"]
        rows.append((token, 1, i // side, i % side))
    return rows[:context]


def compiled_step(model, max_len):
    """A decode step over the whole preallocated cache with a position mask: static shapes."""

    def step(x, pos, kcs, vcs):
        b, d, h, hd = x.shape[0], model.d, model.n_heads, model.head_dim
        mask = torch.arange(max_len) <= pos
        for layer, kc, vc in zip(model.layers, kcs, vcs):
            qkv = rms_norm(x, layer["attn_norm"], model.eps) @ layer["wqkv"]
            q, k, v = (qkv[:, i * d : (i + 1) * d].reshape(b, h, 1, hd) for i in range(3))
            kc.index_copy_(2, pos.reshape(1), k)
            vc.index_copy_(2, pos.reshape(1), v)
            att = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
            x = x + att.reshape(b, d) @ layer["wo"]
            up = torch.relu(rms_norm(x, layer["mlp_norm"], model.eps) @ layer["w_up"])
            x = x + up @ layer["w_down"]
        return rms_norm(x, model.final_norm, model.eps) @ model.head

    return torch.compile(step, dynamic=False)


def sample(logits, first_code):
    """What Kiln's fixture samples with (temperature 1, no top-k or top-p): the next input tokens."""
    return torch.multinomial(torch.softmax(logits, -1), 1)[:, 0] + first_code


class Bench:
    def __init__(self, model, mode):
        self.model, self.mode = model, mode
        self.compiled = {}

    @torch.inference_mode()
    def run(self, batch, context, steps):
        model = self.model
        max_len = context + steps + 1
        cache = model.new_batch_cache(batch, max_len)
        n = model.prefill_batch(fixture_tokens(model, context), cache)
        grid = max(model.cfg["sizes"]) // model.cfg["patch_size"]
        first_code = 258 + 2 * grid
        token = torch.full((batch,), first_code + 5)
        times = []
        if self.mode == "compile":
            key = (batch, max_len)
            if key not in self.compiled:
                self.compiled[key] = compiled_step(model, max_len)
                kcs, vcs = [k.clone() for k, _ in cache], [v.clone() for _, v in cache]
                for _ in range(3):  # compiles, then settles
                    self.compiled[key](model.embed_image(token, 5, 5), torch.tensor(n), kcs, vcs)
            step = self.compiled[key]
            kcs, vcs = [k for k, _ in cache], [v for _, v in cache]
            for i in range(steps):
                pos = torch.tensor(n + i)
                start = time.perf_counter()
                logits = step(model.embed_image(token, 5, 5), pos, kcs, vcs)
                token = sample(logits, first_code)
                times.append(time.perf_counter() - start)
        else:
            for i in range(steps):
                start = time.perf_counter()
                logits = model.decode_step(model.embed_image(token, 5, 5), n + i, cache)
                token = sample(logits, first_code)
                times.append(time.perf_counter() - start)
        return [t * 1e3 for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(Model(args.model), args.mode)
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "mode": args.mode}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            reply = {"step_ms": bench.run(int(req["batch"]), int(req["context"]), int(req["steps"]))}
        except Exception as e:  # the Rust side reports it and goes on without this figure
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
