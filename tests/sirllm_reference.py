"""A slow, obviously-correct dense reference of SirLLM, written from the spec (methods-wave2.md section 3).

It runs the model itself, in fp64, with the harness's calls (prefill chunks of the prompt but its last token, the
last token alone, one call per greedy token) and plain Python bookkeeping:
  - before each call of m tokens (not the first), if len(cache) + m > C (C = start + recent + entropy size):
    keep the top (entropy_size - m) cached tokens by entropy (sorted by (-e, index); none if <= 0), union the first
    `start` slots, then add slots from the newest down to 1 until len = C - m; keep cache order; then multiply
    every retained entropy by decay_ratio (per call, or decay_ratio ** m per token);
  - each layer: every token's un-rotated k/v is stored once, when it is processed; query i of the call attends to
    the retained tokens plus the call's tokens 0..i, the keys rotated at their slot 0..R-1 and the query at R-1
    (R = that key count), one softmax;
  - after the call: logits z at every position (final norm + LM head, fp64); e_j = -log softmax(z[j-1])[x[j]]
    (z[-1] = the previous call's last row), or with entropy_shift_fix=false the code's -log softmax(z[j-1])[x[j-1]];
    a call's first token: call_max = max of the call's own values (the code's version: over all its positions;
    one-token calls fall back to the previous row), predicted = the previous row's value, and a sample's first
    token the call's max.
Used only in tests.
"""

from __future__ import annotations

import copy
import math

import torch


def _rot(x, positions, inv_freq, scaling):  # x [H, n, D] fp64, positions: list of n ints
    ang = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq[None]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _rms(norm, x):
    return norm.weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon))


class DenseSirLLM:
    def __init__(self, model, start_size, recent_size, token_entropy_size, decay_ratio, decay_per, first_token,
                 entropy_shift_fix, **_):
        self.m = copy.deepcopy(model).double()
        c = self.m.config
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.H
        rot = self.m.model.rotary_emb
        self.inv_freq, self.scaling = rot.inv_freq.double(), float(getattr(rot, "attention_scaling", 1.0))
        self.S, self.E = start_size, token_entropy_size
        self.C = start_size + recent_size + token_entropy_size
        self.decay, self.decay_per, self.first, self.fix = decay_ratio, decay_per, first_token, entropy_shift_fix
        nl = c.num_hidden_layers
        self.K, self.V = [[] for _ in range(nl)], [[] for _ in range(nl)]  # per layer, per token: [Hkv, D]
        self.cache: list[int] = []  # token indices held, in cache order
        self.ent: list[float] = []
        self.ids: list[int] = []
        self.prev_row = None  # log softmax of the previous call's last position
        self.calls = 0
        self.slots_seen: list[list[int]] = []  # per call: the token indices retained (for tests)

    def _evict(self, m):
        n = len(self.cache)
        if self.calls and n + m > self.C:
            top = sorted(range(n), key=lambda i: (-self.ent[i], i))[: max(self.E - m, 0)]
            keep = set(top) | set(range(min(self.S, n)))
            for i in range(n - 1, 0, -1):
                if len(keep) >= self.C - m:
                    break
                keep.add(i)
            keep = sorted(keep)
            self.cache = [self.cache[i] for i in keep]
            self.ent = [self.ent[i] for i in keep]
        if self.calls:
            f = self.decay if self.decay_per == "call" else self.decay**m
            self.ent = [e * f for e in self.ent]

    @torch.no_grad()
    def call(self, new_ids: list[int]) -> torch.Tensor:
        """One forward call -> logits of its last position [V] (fp64)."""
        m, first_idx = len(new_ids), len(self.ids)
        self._evict(m)
        self.slots_seen.append(list(self.cache))
        self.ids += new_ids
        toks = list(range(first_idx, first_idx + m))
        mod = self.m.model
        h = mod.embed_tokens.weight[torch.tensor(new_ids)]  # [m, hidden]
        G = self.H // self.Hkv
        for li, layer in enumerate(mod.layers):
            a = layer.self_attn
            x = _rms(layer.input_layernorm, h)
            q = a.q_proj(x).view(m, self.H, self.D).transpose(0, 1)
            k = a.k_proj(x).view(m, self.Hkv, self.D).transpose(0, 1)
            v = a.v_proj(x).view(m, self.Hkv, self.D).transpose(0, 1)
            for i in range(m):
                self.K[li].append(k[:, i])
                self.V[li].append(v[:, i])
            o = torch.zeros(self.H, m, self.D, dtype=torch.float64)
            for i in range(m):
                keys = self.cache + toks[: i + 1]  # retained tokens, then the call's tokens up to the query
                R = len(keys)
                Kk = _rot(torch.stack([self.K[li][t] for t in keys], 1), list(range(R)), self.inv_freq, self.scaling)
                Vv = torch.stack([self.V[li][t] for t in keys], 1)  # [Hkv, R, D]
                qi = _rot(q[:, i : i + 1], [R - 1], self.inv_freq, self.scaling)[:, 0]  # [H, D]
                for hh in range(self.H):
                    w = torch.softmax(Kk[hh // G] @ qi[hh] / math.sqrt(self.D), dim=0)
                    o[hh, i] = w @ Vv[hh // G]
            h = h + a.o_proj(o.transpose(0, 1).reshape(m, -1))
            h = h + layer.mlp(_rms(layer.post_attention_layernorm, h))
        z = self.m.lm_head(_rms(mod.norm, h))  # [m, V] logits at every position
        self._entropies(torch.log_softmax(z, dim=-1), new_ids)
        self.cache += toks
        self.calls += 1
        return z[-1]

    def _entropies(self, logp, new_ids):
        m = len(new_ids)
        prev_ids = [self.ids[-m - 1]] if len(self.ids) > m else [None]
        if self.fix:  # token j: -log softmax(z[j-1])[x[j]]
            own = [-float(logp[j - 1, new_ids[j]]) for j in range(1, m)]
            pred = None if self.prev_row is None else -float(self.prev_row[new_ids[0]])
            call_max = max(own) if own else None
        else:  # the code: token j gets -log softmax(z[j-1])[x[j-1]]; its max runs over all m positions
            vals = [-float(logp[j, new_ids[j]]) for j in range(m)]
            own = vals[:-1]
            pred = None if self.prev_row is None else -float(self.prev_row[prev_ids[0]])
            call_max = max(vals)
        if self.first == "call_max" and call_max is not None:
            e0 = call_max
        elif pred is not None:
            e0 = pred
        else:
            e0 = call_max if call_max is not None else 0.0
        self.ent += [e0] + own
        self.prev_row = logp[-1]


def reference_steps(model, params: dict, ids: torch.Tensor, chunk_size: int, new_tokens: int):
    """The harness's call sequence -> (logits [new_tokens, V] fp64 of every decoded position, tokens, reference)."""
    ref = DenseSirLLM(model, **params)
    x = ids.tolist()
    n = len(x)
    for s in range(0, n - 1, chunk_size):
        ref.call(x[s : min(s + chunk_size, n - 1)])
    logits = [ref.call(x[n - 1 :])]
    tokens = []
    for _ in range(new_tokens - 1):
        tokens.append(int(torch.argmax(logits[-1])))
        logits.append(ref.call([tokens[-1]]))
    tokens.append(int(torch.argmax(logits[-1])))
    return torch.stack(logits), tokens, ref
