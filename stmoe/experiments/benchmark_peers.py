"""stmoe vs Hugging Face `SwitchTransformersForConditionalGeneration` on the same weights.

The model (default, 148.6M parameters): d_model 512, d_ff 2048, 8 heads x 64, 6 + 6 layers,
8 experts top-1 on every other FFN (HF's num_sparse 3 of 6 layers per stack), vocab 32128,
integer expert capacity 96 per sequence (as HF configures it), ReLU FFN, tied embeddings,
no dropout or router jitter. HF's model is built from a `SwitchTransformersConfig` with torch's
random init (nothing is downloaded) and imported with stmoe.interop.hf_switch, so both run the
same weights. Batch 8, inputs 256, targets 64, float32.

1. Parity first: max |logits(stmoe) - logits(HF)| on the benchmark batch.
2. Token agreement: both generate exactly `--targets` tokens greedily with a KV cache (no EOS
   stop on either side, the pad id never chosen on either side); the fraction of equal tokens.
3. Timing, repetitions interleaved (each round times every task of both once; median):
   - train step: forward + backward + AdamW (HF: its loss, cross-entropy + router losses;
     stmoe: losses.total_loss, the same terms), lr 1e-5 so the weights barely move;
   - greedy generation of `--targets` tokens (HF `generate`, stmoe decoding.greedy_decode);
   - forward scoring of the batch (HF forward with labels, stmoe decoding.score).
   HF runs in eager PyTorch with `--threads` intra-op threads; stmoe under jit. The process
   is pinned to `--threads` cores (os.sched_setaffinity) so that both use the same cores.
4. MFU beside each: useful FLOPs / time / the float32 matmul peak measured in this process
   (best 4096^3 matmul in jax and in torch, the larger). Useful FLOPs: projections, attention
   scores and values, dense FFNs, the top-1 expert of each token that fits the capacity (every
   token here: 8 x 96 slots per sequence; stmoe/flops.py), router, logits;
   the train step is 3x the forward; generation counts the encoder once and each step's
   decoder token against the keys cached so far.

    python scripts/benchmark_peers.py --reps 3 --out /tmp/benchmark_peers.json
    python scripts/benchmark_peers.py --small --reps 2     # a tiny model: checks the script in a minute
    python scripts/benchmark_peers.py --reps 3 --expert-execution sequential   # stmoe's slot loop (A/B)

Run by scripts/benchmark_peers.py, which parses the flags (`args` of `main`) and pins the
process to `--threads` cores before jax and torch are imported.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from stmoe import cli, decoding, losses
from stmoe.config import LossConfig
from stmoe.dispatch import resolve_model
from stmoe.flops import forward_macs, generation_macs
from stmoe.interop import hf_switch
from stmoe.models import EncoderDecoder

LR = 1e-5


def hf_config(small: bool) -> transformers.SwitchTransformersConfig:
    fields = dict(vocab_size=32128, d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6,
                  num_decoder_layers=6, num_sparse_encoder_layers=3, num_sparse_decoder_layers=3, num_experts=8,
                  expert_capacity=96)
    if small:
        fields.update(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
                      num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=32)
    return transformers.SwitchTransformersConfig(**fields, dropout_rate=0.0, router_jitter_noise=0.0,
                                                 tie_word_embeddings=True, decoder_start_token_id=0,
                                                 pad_token_id=0, eos_token_id=1)


# ------------------------------------------------- the matmul peak (useful FLOPs: stmoe/flops.py)

def matmul_peak(n: int = 4096, rounds: int = 7) -> dict:
    """Best float32 n^3 matmul rate (FLOP/s) in jax and in torch."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    t = torch.ones((n, n), dtype=torch.float32)
    torch.mm(t, t)
    best = {"jax": float("inf"), "torch": float("inf")}
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        best["jax"] = min(best["jax"], time.perf_counter() - start)
        start = time.perf_counter()
        torch.mm(t, t)
        best["torch"] = min(best["torch"], time.perf_counter() - start)
    return {name: 2 * n ** 3 / s for name, s in best.items()}


# ----------------------------------------------------------------------------- the two sides

class HfSide:
    def __init__(self, config, data):
        torch.manual_seed(0)
        self.model = transformers.SwitchTransformersForConditionalGeneration(config).float()
        self.model.config._attn_implementation = "eager"
        # Generation: no EOS stop (exactly the asked number of tokens), the pad id never chosen
        # (as stmoe's decoding: its logit is -inf).
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.suppress_tokens = [0]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.01)
        self.data = {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in data.items()}

    def state_dict(self) -> dict:
        return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}

    def logits(self):
        self.model.eval()
        with torch.no_grad():
            out = self.model(input_ids=self.data["inputs"], decoder_input_ids=self.data["decoder_inputs"])
        return out.logits.numpy()

    def train_step(self):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        out = self.model(input_ids=self.data["inputs"], labels=self.data["targets"])
        out.loss.backward()
        self.opt.step()
        return out.loss.item()

    def generate(self, steps: int):
        self.model.eval()
        with torch.no_grad():
            tokens = self.model.generate(input_ids=self.data["inputs"], max_new_tokens=steps, do_sample=False,
                                         num_beams=1, use_cache=True)
        return tokens[:, 1:].numpy()  # without the start token

    def score(self):
        self.model.eval()
        with torch.no_grad():
            return float(self.model(input_ids=self.data["inputs"], labels=self.data["targets"]).loss)


class StmoeSide:
    def __init__(self, model: EncoderDecoder, params, data):
        self.model, self.params, self.data = model, params, data
        loss_cfg = LossConfig()  # c_B 1e-2, c_z 1e-3: the terms' cost, whatever their weights
        self.optimizer = optax.adamw(LR, weight_decay=0.01)
        self.opt_state = self.optimizer.init(params)

        def step(params, opt_state, batch):
            def loss_fn(params):
                logits, state = model.apply({"params": params}, batch["inputs"], batch["decoder_inputs"],
                                            batch["targets"], enable_dropout=True, mutable=["moe"],
                                            rngs={"dropout": jax.random.key(0)})
                ce = losses.cross_entropy_sums(logits, batch["targets"])
                return losses.total_loss(ce, losses.moe_losses(state["moe"]), loss_cfg.balance_coef,
                                         loss_cfg.router_z_coef)
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(step, donate_argnums=(0, 1))
        self._logits = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], b["decoder_inputs"],
                                                        b["targets"], enable_dropout=False))
        self.score_batch = {"encoder_input_tokens": data["inputs"], "decoder_input_tokens": data["decoder_inputs"],
                            "decoder_target_tokens": data["targets"]}

    def logits(self):
        return np.asarray(self._logits(self.params, self.data))

    def train_step(self):
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, self.data)
        return float(loss)

    def generate(self, steps: int):
        return np.asarray(decoding.greedy_decode(self.model, self.params, self.data["inputs"],
                                                 max_decode_length=steps, eos_id=-1))  # no EOS stop

    def score(self):
        return float(jnp.sum(decoding.score(self.model, self.params, self.score_batch)))


# ----------------------------------------------------------------------------- main

def main(args):
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    load_before = os.getloadavg()
    config = hf_config(args.small)
    rng = np.random.default_rng(0)
    data = {"inputs": rng.integers(2, config.vocab_size, (args.batch, args.inputs)),
            "targets": rng.integers(2, config.vocab_size, (args.batch, args.targets))}
    data["decoder_inputs"] = np.pad(data["targets"][:, :-1], ((0, 0), (1, 0)))  # start token 0
    hf = HfSide(config, data)
    cfg = hf_switch.config_from_hf(config.to_dict())
    cfg = resolve_model(cfg.replace(moe=cfg.moe.replace(expert_execution=args.expert_execution)))
    model = EncoderDecoder(cfg)  # dispatch, expert execution, grouped kernel: per backend unless given
    params = hf_switch.params_from_hf(cfg, hf.state_dict())
    ours = StmoeSide(model, params, {k: jnp.asarray(v, jnp.int32) for k, v in data.items()})
    n_params = sum(p.numel() for p in hf.model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters (HF count), {cfg.moe.num_experts} experts top-{cfg.moe.top_k}, "
          f"capacity {cfg.moe.expert_capacity}, experts run {cfg.moe.expert_execution!r}; batch {args.batch}, inputs {args.inputs}, targets {args.targets}; "
          f"{args.threads} threads, {cli.memory_allocator()} malloc; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)

    # 1-2. Parity and token agreement, on the shared initial weights (also the warm-up / compilation).
    hf_logits, our_logits = hf.logits(), ours.logits()
    parity = float(np.max(np.abs(hf_logits - our_logits)))
    print(f"logits parity: max |stmoe - HF| = {parity:.2e} (logit scale {np.abs(hf_logits).max():.2f})", flush=True)
    start = time.perf_counter()
    our_tokens = ours.generate(args.targets)
    compile_generate = time.perf_counter() - start
    hf_tokens = hf.generate(args.targets)
    if hf_tokens.shape != our_tokens.shape:
        raise SystemExit(f"generation: HF made {hf_tokens.shape}, stmoe {our_tokens.shape} tokens")
    agreement = float(np.mean(hf_tokens == our_tokens))
    first_diff = np.argmax(hf_tokens != our_tokens, axis=1)
    print(f"greedy tokens: {hf_tokens.size} each, agreement {agreement:.1%}", flush=True)
    start = time.perf_counter()
    ours.train_step()
    compile_train = time.perf_counter() - start
    hf.train_step()
    start = time.perf_counter()
    ours.score()
    compile_score = time.perf_counter() - start
    hf.score()
    print(f"stmoe compile + first call: train {compile_train:.1f} s, generate {compile_generate:.1f} s, "
          f"score {compile_score:.1f} s", flush=True)

    # 3. Interleaved rounds.
    tasks = {"train step (fwd + bwd + AdamW)": lambda side: side.train_step(),
             f"greedy generation of {args.targets} tokens, KV cache": lambda side: side.generate(args.targets),
             "forward scoring": lambda side: side.score()}
    times = {(task, side): [] for task in tasks for side in ("hf", "stmoe")}
    for rep in range(-args.warmup, args.reps):
        for task, fn in tasks.items():
            for name, side in (("hf", hf), ("stmoe", ours)):
                start = time.perf_counter()
                fn(side)
                times[task, name].append(time.perf_counter() - start)
        if rep < 0:  # a warm-up round: timed to show it, then dropped
            print("warm-up round: " + ", ".join(f"{t.split(' (')[0].split(',')[0]} HF {times[t, 'hf'].pop():.2f} s / "
                                                f"stmoe {times[t, 'stmoe'].pop():.2f} s" for t in tasks), flush=True)
            continue
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(f"{t.split(' (')[0].split(',')[0]} HF "
              f"{times[t, 'hf'][-1]:.2f} s / stmoe {times[t, 'stmoe'][-1]:.2f} s" for t in tasks), flush=True)
        # A run killed later (it holds both models: ~7 GiB) keeps the rounds it finished.
        partial = dict(partial=True, rounds_done=rep + 1, logits_max_abs_diff=parity, token_agreement=agreement,
                       load_average_1_5_15=dict(before=load_before),
                       times_s={f"{task} / {side}": t for (task, side), t in times.items()})
        cli.write_result(args.out, partial, announce=False)

    # 4. MFU.
    peaks = matmul_peak()
    peak = max(peaks.values())
    # Experts counted as their capacity lets them run: the train factor in the train step, the eval
    # factor when scoring and generating (stmoe/flops.py).
    fwd = 2 * forward_macs(cfg, args.batch, args.inputs, args.targets)
    flops = {"train step (fwd + bwd + AdamW)": 3 * fwd,
             f"greedy generation of {args.targets} tokens, KV cache":
                 2 * generation_macs(cfg, args.batch, args.inputs, args.targets),
             "forward scoring": 2 * forward_macs(cfg, args.batch, args.inputs, args.targets, deterministic=True)}
    rows = []
    for task in tasks:
        hf_s, our_s = float(np.median(times[task, "hf"])), float(np.median(times[task, "stmoe"]))
        rows.append(dict(task=task, hf_s=hf_s, stmoe_s=our_s, stmoe_over_hf_throughput=hf_s / our_s,
                         useful_flops=flops[task], hf_mfu=flops[task] / hf_s / peak,
                         stmoe_mfu=flops[task] / our_s / peak, hf_all_s=times[task, "hf"],
                         stmoe_all_s=times[task, "stmoe"]))
    load_after = os.getloadavg()
    header = ("", "HF (PyTorch eager)", "stmoe (jit)", "stmoe / HF throughput", "MFU HF", "MFU stmoe")
    lines = [header] + [(r["task"], f"{r['hf_s']:.2f} s", f"{r['stmoe_s']:.2f} s",
                         f"{r['stmoe_over_hf_throughput']:.2f}x", f"{r['hf_mfu']:.0%}", f"{r['stmoe_mfu']:.0%}")
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    table.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()
    print("\n".join(table))
    print(f"median of {args.reps} interleaved rounds after {args.warmup} warm-up; "
          f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"(jax {peaks['jax'] / 1e9:.0f}, torch {peaks['torch'] / 1e9:.0f}); load average (1, 5, 15 min) "
          f"before {load_before}, after {load_after}")
    result = dict(rows=rows, logits_max_abs_diff=parity, token_agreement=agreement,
                  first_difference_per_row=first_diff.tolist(), params=n_params, threads=args.threads,
                  reps=args.reps, warmup_rounds=args.warmup, batch=args.batch, inputs=args.inputs,
                  targets=args.targets, small=args.small,
                  matmul_peak_flops=peaks, stmoe_compile_s=dict(train=compile_train, generate=compile_generate,
                                                                score=compile_score),
                  load_average_1_5_15=dict(before=load_before, after=load_after), jax=jax.__version__,
                  torch=torch.__version__, transformers=transformers.__version__, cpu_count=os.cpu_count(),
                  model_config=cfg.to_dict())
    cli.write_result(args.out, result)

