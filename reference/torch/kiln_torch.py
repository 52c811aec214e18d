"""Kiln's transformer in PyTorch: the reference that the Rust engines are checked and timed against.

It reads the same `config.json` and `model.safetensors` as `kiln_model::Transformer` and computes the
same function: token embedding plus learned text or (row, column) positions, pre-norm blocks of
causal multi-head attention and a ReLU MLP, a final RMS norm and the head over image codes. Matrices
are stored `[in, out]`, so `x @ w` is the product the Rust side computes.

Two ways of running it:
- `Model.forward_sequence` runs one sequence's new tokens over its own contiguous cache (any length,
  prefill or decode): what the logits parity check uses;
- `Model.decode_step` advances a batch of equally long sequences by one token over a preallocated
  `[batch, heads, max_len, head_dim]` cache with `scaled_dot_product_attention`: the fast eager path
  that a PyTorch user would write, which the decode benchmark times.

No dependency but torch: the safetensors file is parsed here (an 8-byte header length, a JSON
header, raw little-endian data).
"""

import json
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}


def load_safetensors(path):
    """Every tensor of a safetensors file, by name."""
    data = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = _DTYPES[meta["dtype"]]
        raw = bytearray(body[start:end])
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(meta["shape"])
    return tensors


def rms_norm(x, weight, eps):
    # The Rust side: mean of squares, plus eps, inverse square root, times the weight.
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Model:
    def __init__(self, model_dir, dtype=torch.float32):
        model_dir = Path(model_dir)
        self.cfg = json.loads((model_dir / "config.json").read_text())
        w = load_safetensors(model_dir / "model.safetensors")
        cfg = self.cfg
        self.d = cfg["d_model"]
        self.n_heads = cfg["n_heads"]
        self.head_dim = self.d // self.n_heads
        self.eps = cfg.get("norm_eps", 1e-5)
        self.n_layers = cfg["n_layers"]
        self.dtype = dtype
        f = lambda name: w[name].to(dtype).contiguous()
        self.tok_emb, self.text_pos = f("tok_emb"), f("text_pos")
        self.row_emb, self.col_emb = f("row_emb"), f("col_emb")
        self.final_norm, self.head = f("final_norm"), f("head")
        self.layers = [
            {n: f(f"layers.{l}.{n}") for n in ("attn_norm", "wqkv", "wo", "mlp_norm", "w_up", "w_down")}
            for l in range(self.n_layers)
        ]

    def embed(self, tokens):
        """`tokens`: rows of (token, kind, a, b), kind 0 = text position a, kind 1 = image (row a, col b)."""
        t = torch.tensor(tokens, dtype=torch.long).reshape(-1, 4)
        x = self.tok_emb[t[:, 0]].clone()
        for row, (_, kind, a, b) in enumerate(t.tolist()):
            # In the Rust side's order: the token, then the row, then the column.
            if kind == 0:
                x[row] += self.text_pos[a]
            else:
                x[row] += self.row_emb[a]
                x[row] += self.col_emb[b]
        return x

    def embed_image(self, tokens, row, col):
        """Image inputs `tokens` (a 1-D tensor), all at patch (row, col): the batched decode input."""
        x = self.tok_emb[tokens] + self.row_emb[row]
        return x + self.col_emb[col]

    def new_cache(self):
        """An empty per-sequence cache for `forward_sequence`: per layer, keys and values `[heads, len, hd]`."""
        empty = torch.empty(self.n_heads, 0, self.head_dim, dtype=self.dtype)
        return [[empty, empty] for _ in range(self.n_layers)]

    @torch.inference_mode()
    def forward_sequence(self, tokens, cache):
        """Runs one sequence's new tokens, appending to `cache`; returns the logits of its last token."""
        x = self.embed(tokens)
        n, d, h, hd = x.shape[0], self.d, self.n_heads, self.head_dim
        for layer, kv in zip(self.layers, cache):
            qkv = rms_norm(x, layer["attn_norm"], self.eps) @ layer["wqkv"]
            q, k, v = (qkv[:, i * d : (i + 1) * d].reshape(n, h, hd).transpose(0, 1) for i in range(3))
            kv[0] = torch.cat([kv[0], k], dim=1)
            kv[1] = torch.cat([kv[1], v], dim=1)
            past = kv[0].shape[1] - n
            # Row i sees every cached position and the new ones up to itself.
            mask = torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)
            att = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
            x = x + att.transpose(0, 1).reshape(n, d) @ layer["wo"]
            up = torch.relu(rms_norm(x, layer["mlp_norm"], self.eps) @ layer["w_up"])
            x = x + up @ layer["w_down"]
        return rms_norm(x[-1:], self.final_norm, self.eps) @ self.head

    def new_batch_cache(self, batch, max_len):
        """A preallocated cache for `decode_step`: per layer, keys and values `[batch, heads, max_len, hd]`."""
        shape = (batch, self.n_heads, max_len, self.head_dim)
        return [[torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)] for _ in range(self.n_layers)]

    @torch.inference_mode()
    def prefill_batch(self, tokens, cache):
        """Runs the same prefix for every row of a batch cache (the benchmark's fixture); returns its length."""
        single = self.new_cache()
        self.forward_sequence(tokens, single)
        n = single[0][0].shape[1]
        for (k, v), (sk, sv) in zip(cache, single):
            k[:, :, :n] = sk
            v[:, :, :n] = sv
        return n

    @torch.inference_mode()
    def decode_step(self, x, pos, cache):
        """One decode step of a batch whose sequences all hold `pos` cached tokens: `x` `[batch, d]`
        embedded inputs; writes position `pos` of the cache and returns the logits `[batch, codes]`."""
        b, d, h, hd = x.shape[0], self.d, self.n_heads, self.head_dim
        for layer, (kc, vc) in zip(self.layers, cache):
            qkv = rms_norm(x, layer["attn_norm"], self.eps) @ layer["wqkv"]
            q, k, v = (qkv[:, i * d : (i + 1) * d].reshape(b, h, 1, hd) for i in range(3))
            kc[:, :, pos : pos + 1] = k
            vc[:, :, pos : pos + 1] = v
            att = F.scaled_dot_product_attention(q, kc[:, :, : pos + 1], vc[:, :, : pos + 1])
            x = x + att.reshape(b, d) @ layer["wo"]
            up = torch.relu(rms_norm(x, layer["mlp_norm"], self.eps) @ layer["w_up"])
            x = x + up @ layer["w_down"]
        return rms_norm(x, self.final_norm, self.eps) @ self.head

