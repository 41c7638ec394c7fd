#!/usr/bin/env python3
"""Trains the recall model (scripts/make-recall-model.ts runs this; see scripts/recall/dialogues.ts).

A llama-architecture transformer exactly as llama.cpp computes it (RMSNorm, RoPE on adjacent pairs
as LLAMA_ROPE_TYPE_NORM, GQA with consecutive query heads sharing a KV head, SwiGLU FFN, untied
output), so the exported weights need no conversion: a PyTorch [out, in] weight is ggml's [in, out].

Input (from the TypeScript side, which tokenized the dialogues with llama.cpp itself):
  DATA/tokens.i32   N x T token ids
  DATA/weights.f32  N x T loss weight of predicting token t+1 at t (0 = padding)
  DATA/meta.json    {"n": N, "t": T, "vocab": V, "model": {...geometry...}, "train": {...}, "evalN": E}
  DATA/eval.i32, DATA/eval-weights.f32   E x T held-out conversations of the check's shape: every
                    `evalEvery` steps their answers are scored teacher-forced (all of an answer's code
                    tokens right), an estimate of the check, which decodes greedily and so answers
                    fewer (two runs read 10.5% and 11.1% here, their checks 8.4% and 5.0%),
                    to see early where a recipe is going
Training: phases (RECIPE in scripts/make-recall-model.ts). A "pairs" phase drills the lookup alone
(PairDrill: facts and their repeats in the dialogues' tokens); the other phases crop the dialogues.
Every phase adds the attention hint: two heads of one layer are pushed to look, at each code token
to predict, where that token followed the same token before (an induction head's pattern). The
exported model is a plain llama; the hint only shapes training. Without drill and hint every recipe
tried learned to copy some fact's code, not the one asked for (first code token right 31% of the
time with 4 facts); with them the lookup forms in the drill (0.97 of its code tokens by step 650,
0.21 at step 500 without the hint) and carries over to the dialogues at once.
Output:
  OUT/weights.bin + OUT/weights.json   float32 tensors by GGUF name, ggml dims
Uses only Debian's python3-torch (and numpy); fixed seed, CPU threads as given.
"""
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(t, head_dim, base):
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cos(ang), torch.sin(ang)  # [t, head_dim/2]


def apply_rope(x, cos, sin):
    # x: [b, h, t, d]; rotate adjacent pairs (x[2i], x[2i+1]) like ggml's NORM mode.
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    r0 = x0 * cos - x1 * sin
    r1 = x0 * sin + x1 * cos
    return torch.stack((r0, r1), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, g):
        super().__init__()
        e, h, kv, d, f = g["embd"], g["heads"], g["kvHeads"], g["headDim"], g["ffn"]
        self.h, self.kv, self.d = h, kv, d
        self.keep_attention = False  # set for the layer whose attention the hint supervises
        self.attention = None
        self.attn_norm = RMSNorm(e, g["eps"])
        self.q = nn.Linear(e, h * d, bias=False)
        self.k = nn.Linear(e, kv * d, bias=False)
        self.v = nn.Linear(e, kv * d, bias=False)
        self.o = nn.Linear(h * d, e, bias=False)
        self.ffn_norm = RMSNorm(e, g["eps"])
        self.gate = nn.Linear(e, f, bias=False)
        self.up = nn.Linear(e, f, bias=False)
        self.down = nn.Linear(f, e, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        y = self.attn_norm(x)
        q = self.q(y).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(y).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v(y).view(b, t, self.kv, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(self.d) + mask).softmax(-1)
        self.attention = att if self.keep_attention else None
        y = (att @ v).transpose(1, 2).reshape(b, t, self.h * self.d)
        x = x + self.o(y)
        y = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Model(nn.Module):
    def __init__(self, g, vocab, embedding_std):
        super().__init__()
        self.g = g
        self.embd = nn.Embedding(vocab, g["embd"])
        self.blocks = nn.ModuleList([Block(g) for _ in range(g["layers"])])
        self.norm = RMSNorm(g["embd"], g["eps"])
        self.out = nn.Linear(g["embd"], vocab, bias=False)
        # Embeddings of unit scale, as large as what the blocks add: at std 0.04 the first layer's
        # output was ten times the token's own embedding, so later layers barely saw which token a
        # position holds (the copy plateau came about 200 steps later).
        nn.init.normal_(self.embd.weight, std=embedding_std)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "embd" not in name:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))
        for blk in self.blocks:  # residual branches start small
            nn.init.normal_(blk.o.weight, std=0.5 / math.sqrt(blk.o.weight.shape[1] * len(self.blocks)))
            nn.init.normal_(blk.down.weight, std=0.5 / math.sqrt(blk.down.weight.shape[1] * len(self.blocks)))

    def forward(self, tokens, rows=None):
        """Logits [b, t, vocab], or [n, vocab] at the positions where the bool mask `rows` is set."""
        t = tokens.shape[1]
        cos, sin = rope_tables(t, self.g["headDim"], self.g["ropeBase"])
        mask = torch.full((t, t), float("-inf")).triu(1)
        x = self.embd(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin, mask)
        x = self.norm(x)
        return self.out(x if rows is None else x[rows])

    def gguf_tensors(self):
        """(name, ggml dims, values) in llama.cpp's names; ggml dims are PyTorch's shape reversed."""
        def item(name, p):
            a = p.detach().contiguous().numpy().astype(np.float32)
            return name, list(reversed(a.shape)), a
        yield item("token_embd.weight", self.embd.weight)
        yield item("output_norm.weight", self.norm.weight)
        yield item("output.weight", self.out.weight)
        for i, b in enumerate(self.blocks):
            p = f"blk.{i}."
            yield item(p + "attn_norm.weight", b.attn_norm.weight)
            yield item(p + "attn_q.weight", b.q.weight)
            yield item(p + "attn_k.weight", b.k.weight)
            yield item(p + "attn_v.weight", b.v.weight)
            yield item(p + "attn_output.weight", b.o.weight)
            yield item(p + "ffn_norm.weight", b.ffn_norm.weight)
            yield item(p + "ffn_gate.weight", b.gate.weight)
            yield item(p + "ffn_up.weight", b.up.weight)
            yield item(p + "ffn_down.weight", b.down.weight)


def induction_sources(x, targets):
    """[b, t, s]: for a recall target predicted at t (`targets` [b, t]), the earlier positions s that hold
    the same token after the same token (x[s - 1] == x[t], x[s] == x[t + 1]): where the fact (or an
    earlier answer) stated what comes next. An induction head attends there."""
    b, t = x.shape[0], x.shape[1] - 1
    inp, nxt = x[:, :-1], x[:, 1:]
    src = torch.zeros(b, t, t, dtype=torch.bool)
    src[:, :, 1:] = (inp[:, None, 1:] == nxt[:, :, None]) & (inp[:, None, :-1] == inp[:, :, None])
    return src & torch.ones(t, t, dtype=torch.bool).tril()[None] & targets[:, :, None]


def attention_hint_loss(model, hint, sources):
    """How far the hinted heads are from putting `hint["mass"]` of their attention on the sources:
    -log(attention on the sources), above -log(mass), averaged over the targets that have a source."""
    has = sources.any(-1)
    if not has.any():
        return torch.zeros(())
    att = model.blocks[hint["layer"]].attention
    floor = -math.log(hint["mass"])
    loss = torch.zeros(())
    for h in hint["heads"]:
        on_sources = (att[:, h] * sources).sum(-1)[has]
        loss = loss + (-(on_sources + 1e-6).log() - floor).clamp(min=0).mean()
    return loss


class PairDrill:
    """Batches of bare key-value recall in the dialogues' own tokens: `k` facts "Mila ▁48 17 ." stated
    once, then repeated in random order between filler tokens, and only the repeats' codes are
    targets (MQAR as in Zoology). Trained first, with the attention hint, this is where the lookup
    forms; the dialogues then only have to use it.

    The tokens come from the data: every answer is name, code, code, full stop."""

    def __init__(self, tokens, weights, seed):
        x, w = tokens.numpy(), weights.numpy()
        # An answer's first code token is predicted at t and its second at t + 1 (both weight >= 1).
        r, t = np.nonzero((w[:, :-3] >= 1) & (w[:, 1:-2] >= 1))
        self.names = np.unique(x[r, t])
        self.first = np.unique(x[r, t + 1])
        self.second = np.unique(x[r, t + 2])
        self.stop = int(np.bincount(x[r, t + 3]).argmax())
        self.bos = int(x[0, 0])
        special = set(self.names) | set(self.first) | set(self.second) | {self.stop, 0}
        self.filler = np.array(sorted(set(np.unique(x).tolist()) - special))
        self.rng = np.random.default_rng(seed)

    def batch(self, size, length, max_pairs):
        rng = self.rng
        x = np.zeros((size, length), dtype=np.int64)
        w = np.zeros((size, length), dtype=np.float32)  # w[t]: weight of predicting x[t + 1]
        for b in range(size):
            k = int(rng.integers(2, max_pairs + 1))
            names = rng.choice(self.names, k, replace=False)
            first, second = rng.choice(self.first, k), rng.choice(self.second, k)
            seq, target = [self.bos], []
            for i in range(k):
                seq += [names[i], first[i], second[i], self.stop]
            while len(seq) < length - 4:
                if rng.random() < 0.5:
                    seq.append(int(rng.choice(self.filler)))
                else:
                    i = int(rng.integers(k))
                    target += [len(seq), len(seq) + 1]  # predicting the two code tokens after the name
                    seq += [names[i], first[i], second[i], self.stop]
            x[b, : len(seq)] = seq
            w[b, target] = 1
        return torch.from_numpy(x), torch.from_numpy(w)


def answer_accuracy(model, tokens, weights):
    """Teacher-forced, on held-out conversations: the share of answers (runs of weight-1 targets)
    whose code tokens all come out right, and the share of code tokens."""
    with torch.no_grad():
        rows = weights[:, :-1] >= 1
        right = model(tokens[:, :-1], rows).argmax(-1) == tokens[:, 1:][rows]
    # Consecutive positions in a row form one answer; an answer is right when all its tokens are.
    pos = rows.nonzero().tolist()
    answers = wrong = 0
    for k, (r, c) in enumerate(pos):
        if k == 0 or pos[k - 1] != [r, c - 1]:
            answers += 1
            bad = False
        if not bad and not right[k]:
            bad = True
            wrong += 1
    return 1 - wrong / max(answers, 1), right.float().mean().item()


def main(data_dir, out_dir):
    meta = json.load(open(f"{data_dir}/meta.json"))
    n, t, vocab, g, tr = meta["n"], meta["t"], meta["vocab"], meta["model"], meta["train"]
    torch.manual_seed(tr["seed"])
    torch.set_num_threads(tr["threads"])
    tokens = torch.from_numpy(np.fromfile(f"{data_dir}/tokens.i32", dtype=np.int32).reshape(n, t).astype(np.int64))
    weights = torch.from_numpy(np.fromfile(f"{data_dir}/weights.f32", dtype=np.float32).reshape(n, t))
    n_eval = meta.get("evalN", 0)
    if n_eval:
        eval_tokens = torch.from_numpy(np.fromfile(f"{data_dir}/eval.i32", dtype=np.int32).reshape(n_eval, t).astype(np.int64))
        eval_weights = torch.from_numpy(np.fromfile(f"{data_dir}/eval-weights.f32", dtype=np.float32).reshape(n_eval, t))
    model = Model(g, vocab, tr["embeddingStd"])
    hint = tr["attentionHint"]
    model.blocks[hint["layer"]].keep_attention = True
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    # Curriculum: short crops first (cheap, many questions per second), then the full length.
    phases = tr["phases"]
    steps = sum(ph["steps"] for ph in phases)
    warmup = tr["warmup"]
    gen = torch.Generator().manual_seed(tr["seed"])
    drill = PairDrill(tokens, weights, tr["seed"])
    print(f"recall model: {params} parameters, {n} conversations x {t} tokens, phases {phases}", flush=True)
    t0 = time.time()
    step = 0
    hits = total = 0.0
    for ph in phases:
        # Each phase has its own learning rate (default the recipe's), constant or decayed along a
        # cosine to a tenth of it: induction emerges only while the rate is still high.
        peak = ph.get("lr", tr["lr"])
        for k in range(ph["steps"]):
            decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / ph["steps"])) if ph.get("decay", True) else 1.0
            lr = peak * min(1.0, (step + 1) / warmup) * decay
            for group in opt.param_groups:
                group["lr"] = lr
            if ph.get("kind") == "pairs":
                x, w = drill.batch(ph["batch"], ph["crop"], ph["maxPairs"])
            else:
                idx = torch.randint(0, n, (ph["batch"],), generator=gen)
                x, w = tokens[idx, : ph["crop"]], weights[idx, : ph["crop"]].clone()
            w[:, -1] = 0  # the crop's last token has no target inside the crop
            # Trim the batch to its longest sequence (padding has weight 0).
            nz = (w.sum(0) > 0).nonzero()
            used = int(nz.max().item()) + 2 if len(nz) else x.shape[1]
            x, w = x[:, :used], w[:, :used]
            # Logits only where a target has weight (padding, and the user's text if it weighs 0):
            # the same loss; with the user's text at 0 the step was 10% faster.
            rows = w[:, :-1] > 0
            logits = model(x[:, :-1], rows)
            target = x[:, 1:][rows]
            ww = w[:, :-1][rows]
            loss_tok = F.cross_entropy(logits, target, reduction="none")
            loss = (loss_tok * ww).sum() / ww.sum()
            hint_loss = attention_hint_loss(model, hint, induction_sources(x, w[:, :-1] >= 1))
            loss = loss + hint["weight"] * hint_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            # Teacher-forced accuracy on the recall targets (weight 1: answers' codes, summaries), as training goes.
            full = ww >= 1
            hits += (logits.detach().argmax(-1)[full] == target[full]).sum().item()
            total += full.sum().item()
            if step % 50 == 0 or step == steps - 1:
                print(f"step {step:5d}  crop {ph['crop']:4d}  loss {loss.item():.4f}  hint {hint_loss.item():.3f}  recall acc {hits / max(total, 1):.3f}  lr {lr:.2e}  {time.time() - t0:6.1f} s", flush=True)
                hits = total = 0.0
            if n_eval and (step % tr["evalEvery"] == 0 or step == steps - 1):
                answers, codes = answer_accuracy(model, eval_tokens, eval_weights)
                print(f"  held-out, teacher-forced: answers {answers:.3f}  code tokens {codes:.3f}", flush=True)
            step += 1
    # Logits for the parity sequence, which the exported GGUF must reproduce in llama.cpp.
    parity = torch.from_numpy(np.fromfile(f"{data_dir}/parity.i32", dtype=np.int32).astype(np.int64))[None, :]
    with torch.no_grad():
        model(parity)[0].numpy().astype(np.float32).tofile(f"{out_dir}/parity.f32")
    index = {}
    offset = 0
    with open(f"{out_dir}/weights.bin", "wb") as f:
        for name, dims, a in model.gguf_tensors():
            f.write(a.tobytes())
            index[name] = {"dims": dims, "offset": offset}
            offset += a.nbytes
    json.dump({"tensors": index, "parameters": params, "seconds": time.time() - t0, "steps": steps}, open(f"{out_dir}/weights.json", "w"))
    print(f"trained in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
