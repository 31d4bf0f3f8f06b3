"""Token tracing: which tokens each expert of each MoE layer takes, from the model's own routing.

    loaded = inference.load("runs/quickstart")
    inputs, targets = task_examples(loaded, split="validation", num_rows=256)
    result = trace(loaded, inputs, targets)             # + domains=... for the offline corpus
    write_outputs(result, "runs/quickstart/trace")      # report.md, trace.json, *.png

`scripts/trace_tokens.py` does all of this for a checkpoint. The routing comes from deterministic
teacher-forced passes at the eval capacity factor (as `inference.routing_stats`): applied with
mutable=['intermediates'], every MoeLayer sows each token's choices (`expert_index`, `wanted`,
`kept`, [batch, length, k]; stmoe/moe.py step 6) next to its 'moe' metrics; nothing here
recomputes a routing decision.

Definitions, per MoE layer. "Tokens" are real tokens only (padding excluded). An encoder layer
routes the encoder input tokens; a decoder layer routes the decoder input tokens, i.e. the targets
shifted right, so its position 0 is the start id (shown as <start>) and a sentinel is routed at the
position where it is fed in.

- top-1 expert of a token: `expert_index[..., 0]`, the router's first choice (its most probable
  expert), whether or not the capacity then kept it.
- entropy of a kind of tokens (all tokens, or sentinels = the vocabulary's extra ids, the span
  corruption's sentinels): H = -sum_e p_e ln p_e (nats, 0 ln 0 = 0), where p_e is the fraction of
  the tokens of that kind whose top-1 expert is e: the entropy of the empirical distribution of
  top-1 choices over the E experts. ln E when they spread evenly over the experts, 0 when they all
  go to one. ST-MoE (Zoph et al. 2022, arXiv 2202.08906) Table 14 reports it for sentinels.
- top tokens of expert e: the token ids whose top-1 expert is e, most frequent first, with counts.
- domain matrix (offline corpus only; rows of one domain each, `domain_examples`):
  M[d, e] = fraction of domain d's tokens whose top-1 expert is e; every row sums to 1.
  domain_information = I(top-1 expert; domain) over those tokens, nats: 0 when the choice ignores
  the domain, H(domain) when it names it. Compare it with the untrained model's, not with 0: a
  random router already hashes tokens by content, and domains differ in their tokens.
- first vs second choice (top_k >= 2):
  first_kept / second_kept = share of tokens whose rank-1 / rank-2 choice got a slot;
  second_wanted = share whose second choice asked for one (1 in these deterministic passes; below 1
  only under the training-time 'random' policy); pairs[i, j] = share of tokens whose first choice is
  i and second choice j (before capacity; the diagonal is 0 by construction); mutual_information =
  I(first; second) of that pair distribution, nats: 0 when the second choice does not depend on
  the first, H(second) when the first fixes it (experts used in fixed pairs).
  Not reported: agreement of choices across layers. Expert e of one layer and expert e of another
  are unrelated weights, so equal indices across layers mean nothing.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from stmoe import decoding, inference, partitioning, reporting
from stmoe import metrics as moe_metrics

TOP_TOKENS = 10
SYNTHETIC_FAMILY = "stmoe_synthetic_span_corruption"  # the task whose documents carry a domain
# Documents scanned for each domain's stream: the whole validation split, or this many of a larger one.
MAX_SCANNED_DOCUMENTS = 20_000


# ------------------------------------------------------------------------------ capture


def collect_routing(intermediates: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{'encoder': {'layers_1': {'ffn': {'moe': {'routing': ({...},)}}}}} -> {'encoder/layers_1/ffn': {...}}.

    Scanned stacks (nn.scan) keep a leading layer axis; metrics.expand_scanned splits it.
    """
    layers: dict[str, dict[str, Any]] = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, Mapping):
            return
        if "routing" in node:
            value = node["routing"]
            layers["/".join(p for p in path if p != "moe")] = dict(value[0] if isinstance(value, tuple) else value)
        for key in sorted(node):
            if key != "routing":
                visit(node[key], path + (str(key),))

    visit(intermediates, ())
    return moe_metrics.expand_scanned(layers)


def _capture_pass(params, batch, *, model):
    """One deterministic teacher-forced pass -> ({layer: sown 'moe' stats}, {layer: sown routing})."""
    _, variables = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                               batch["decoder_target_tokens"], enable_dropout=False,
                               mutable=["moe", "intermediates"])
    stats = moe_metrics.expand_scanned(moe_metrics.collect_layers(variables.get("moe", {})))
    return {layer: s.as_dict() for layer, s in stats.items()}, collect_routing(variables.get("intermediates", {}))


# ------------------------------------------------------------------------------ data


def resolve_task(loaded: inference.LoadedModel, task: str | None = None) -> str:
    """The registered seqio name of `task` (a family, default the run's data.task) with the run's
    vocabulary. Raises KeyError for an unknown task."""
    from stmoe.data import tasks

    data = loaded.run_config.data
    if task is None and data.text_files:
        vocab_path = data.vocab_path or None
        return tasks.register_text_files_task(
            "stmoe_text_files", {"train": data.text_files, "validation": data.text_files}, vocab_path)
    family = task or data.task
    return tasks.task_name_for(family, data.vocab_path or tasks.families().get(family))


def has_domains(task_name: str) -> bool:
    """Whether `task_name` is the offline corpus's span corruption (whose documents have a domain)."""
    return task_name.split(".")[0] == SYNTHETIC_FAMILY


def _lengths(loaded: inference.LoadedModel) -> dict[str, int]:
    return {"inputs": loaded.inputs_length, "targets": loaded.targets_length}


def _to_arrays(dataset, num_rows: int, lengths: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    inputs, targets = [], []
    for example, _ in zip(dataset.as_numpy_iterator(), range(num_rows)):
        inputs.append(example["encoder_input_tokens"])
        targets.append(example["decoder_target_tokens"])
    if not inputs:
        return (np.zeros((0, lengths["inputs"]), np.int32), np.zeros((0, lengths["targets"]), np.int32))
    return np.stack(inputs).astype(np.int32), np.stack(targets).astype(np.int32)


def task_examples(loaded: inference.LoadedModel, task_name: str | None = None, split: str = "validation",
                  num_rows: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [n, enc_len], targets [n, dec_len]): the first `num_rows` examples of the task's `split`
    at the run's lengths, one example per row (unpacked), in order (no shuffling)."""
    import seqio

    name = task_name or resolve_task(loaded)
    lengths = _lengths(loaded)
    ds = seqio.get_dataset(name, task_feature_lengths=lengths, feature_converter=seqio.EncDecFeatureConverter(
        pack=False), dataset_split=split, shuffle=False, num_epochs=1, seed=seed, verbose=False)
    return _to_arrays(ds, num_rows, lengths)


def domain_examples(loaded: inference.LoadedModel, task_name: str, split: str = "validation",
                    rows_per_domain: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, domain ids [n] into corpus.DOMAINS): rows of ONE domain each.

    The task's own preprocessors (span corruption, EOS, lengths) run on a stream of only that
    domain's documents of `split` (corpus.document gives each document's domain), so every token of
    a row, sentinels and EOS included, belongs to its domain. The task itself concatenates
    documents of all domains before cutting chunks, so its rows mix domains and cannot be labelled
    per token; these rows are the same kind of example without the mixing.
    """
    import seqio
    from stmoe.data import corpus

    base = seqio.get_mixture_or_task(task_name)
    lengths = _lengths(loaded)
    scanned = min(corpus.SPLIT_SIZES[split], MAX_SCANNED_DOCUMENTS)
    by_domain: dict[str, list[int]] = {d: [] for d in corpus.DOMAINS}
    for index in range(scanned):
        by_domain[corpus.document(split, index)[0]].append(index)
    all_inputs, all_targets, all_domains = [], [], []
    for domain_id, domain in enumerate(corpus.DOMAINS):
        indices = by_domain[domain]
        source = corpus.GeneratedSource(lambda s, i, indices=indices: {"text": corpus.document(s, indices[i])[1]},
                                        ["text"], {split: len(indices)})
        task = seqio.Task(f"{task_name}.trace_{domain}", source=source, output_features=base.output_features,
                          preprocessors=base.preprocessors)
        ds = task.get_dataset(lengths, split=split, shuffle=False, seed=seed)
        ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
        inputs, targets = _to_arrays(ds, rows_per_domain, lengths)
        all_inputs.append(inputs)
        all_targets.append(targets)
        all_domains.append(np.full(len(inputs), domain_id, np.int32))
    return np.concatenate(all_inputs), np.concatenate(all_targets), np.concatenate(all_domains)


# ------------------------------------------------------------------------------ statistics


def entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the distribution proportional to `counts` [n]; nan when they sum to 0."""
    counts = np.asarray(counts, np.float64)
    if counts.sum() <= 0:
        return float("nan")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def top1_entropy(top1: np.ndarray, num_experts: int) -> float:
    """Entropy (nats) of the empirical distribution of `top1` [n] expert ids over `num_experts`;
    nan for n = 0."""
    return entropy(np.bincount(top1, minlength=num_experts))


def mutual_information(pairs: np.ndarray) -> float:
    """I(X; Y), nats, of a joint distribution pairs [E, E] (sums to 1)."""
    total = pairs.sum()
    if total <= 0:
        return float("nan")
    joint = pairs / total
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (px * py)[nz])).sum())


def is_sentinel(tokens: np.ndarray, vocabulary) -> np.ndarray:
    """Span-corruption sentinels: the vocabulary's extra ids (the top `extra_ids` ids)."""
    return tokens >= vocabulary.vocab_size - vocabulary.extra_ids


def token_text(vocabulary, token_id: int, *, decoder: bool = False) -> str:
    """A token as readable text: <start> (decoder position 0), </s>, <extra_id_i>, else the decoded
    piece with newline / tab / space visible."""
    token_id = int(token_id)
    if token_id == 0:
        return "<start>" if decoder else "<pad>"
    if token_id == decoding.EOS_ID:
        return "</s>"
    if token_id >= vocabulary.vocab_size - vocabulary.extra_ids:
        return f"<extra_id_{vocabulary.vocab_size - 1 - token_id}>"
    text = vocabulary.decode([token_id])
    if not text:
        return f"<id {token_id}>"
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")


@dataclasses.dataclass
class _LayerTokens:
    """One layer's real tokens over all traced rows, flat [n] / [n, k]."""

    tokens: list = dataclasses.field(default_factory=list)
    expert_index: list = dataclasses.field(default_factory=list)
    wanted: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)
    domains: list = dataclasses.field(default_factory=list)

    def add(self, tokens, mask, routing, domains):
        self.tokens.append(tokens[mask])
        for name in ("expert_index", "wanted", "kept"):
            getattr(self, name).append(np.asarray(routing[name])[mask])
        self.domains.append(domains[mask])

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(getattr(self, name)) for name in
                ("tokens", "expert_index", "wanted", "kept", "domains")}


def _run(loaded: inference.LoadedModel, inputs: np.ndarray, targets: np.ndarray, domains: np.ndarray,
         batch_size: int, layers: dict[str, _LayerTokens], router: dict[str, list[float]]) -> None:
    """Runs the capture over the rows and appends each layer's real tokens to `layers`; `router`
    gets [token-weighted router_entropy sum, router_confidence sum, tokens] from the sown stats."""
    fn = decoding.jit_static(_capture_pass, model=loaded.model)
    with partitioning.activate(loaded.mesh):
        for _, (enc, tgt, dom) in inference._batches(loaded, [inputs, targets, domains], batch_size):
            # Rows padded onto the last batch are all zeros: no real token, counted nowhere.
            batch = inference._teacher_forced(loaded, enc, tgt)
            stats, routing = jax.device_get(fn(loaded.params, batch))
            dec_in = np.asarray(batch["decoder_input_tokens"])
            for layer, values in routing.items():
                encoder = layer.startswith("encoder")
                tokens = enc if encoder else dec_in
                mask = (enc if encoder else tgt) > 0  # the model's own token masks (models.py)
                dom_rows = np.broadcast_to(dom[:, None], tokens.shape)
                layers.setdefault(layer, _LayerTokens()).add(tokens, mask, values, dom_rows)
                count = float(mask.sum())
                acc = router.setdefault(layer, [0.0, 0.0, 0.0])
                acc[0] += float(stats[layer]["router_entropy"]) * count
                acc[1] += float(stats[layer]["router_confidence"]) * count
                acc[2] += count


def _layer_summary(a: Mapping[str, np.ndarray], num_experts: int, vocabulary, decoder: bool,
                   router: Sequence[float]) -> dict[str, Any]:
    top1 = a["expert_index"][:, 0].astype(np.int64)
    sentinel = is_sentinel(a["tokens"], vocabulary)
    k = a["expert_index"].shape[1]
    out: dict[str, Any] = {
        "tokens": int(top1.size), "sentinel_tokens": int(sentinel.sum()),
        "entropy_all": top1_entropy(top1, num_experts),
        "entropy_sentinel": top1_entropy(top1[sentinel], num_experts),
        "top1_share_all": (np.bincount(top1, minlength=num_experts) / max(top1.size, 1)).tolist(),
        "top1_share_sentinel": (np.bincount(top1[sentinel], minlength=num_experts)
                                / max(int(sentinel.sum()), 1)).tolist(),
    }
    top_tokens = {}
    for e in range(num_experts):
        counts = collections.Counter(a["tokens"][top1 == e].tolist())
        top_tokens[str(e)] = [{"id": int(t), "text": token_text(vocabulary, t, decoder=decoder), "count": int(c)}
                              for t, c in counts.most_common(TOP_TOKENS)]
    out["top_tokens"] = top_tokens

    # Health of the traced tokens (same metric names as stmoe.metrics, for reporting.health_flags).
    wanted, kept = a["wanted"], a["kept"]
    n = max(top1.size, 1)
    health = {f"dropped_fraction_rank{r + 1}": float((wanted[:, r] & ~kept[:, r]).sum() / n) for r in range(k)}
    health["dropped_tokens"] = float((~kept.any(axis=1)).sum() / n)
    load = np.bincount(a["expert_index"][kept].astype(np.int64), minlength=num_experts).astype(np.float64)
    health["load_cv"] = float(load.std() / max(load.mean(), 1e-9))
    health["router_entropy"] = router[0] / max(router[2], 1.0)
    health["router_confidence"] = router[1] / max(router[2], 1.0)
    health.update({f"expert_{e}_tokens": float(c) for e, c in enumerate(load)})
    out["health"] = health

    if k >= 2:
        first, second = a["expert_index"][:, 0], a["expert_index"][:, 1]
        pairs = np.zeros((num_experts, num_experts))
        np.add.at(pairs, (first, second), 1.0)
        pairs /= n
        order = np.argsort(-pairs, axis=None)[:TOP_TOKENS]
        out["first_second"] = {
            "first_kept": float(kept[:, 0].sum() / n), "second_wanted": float(wanted[:, 1].sum() / n),
            "second_kept": float(kept[:, 1].sum() / n), "pairs": pairs.tolist(),
            "mutual_information": mutual_information(pairs),
            "entropy_second": top1_entropy(second.astype(np.int64), num_experts),
            "top_pairs": [{"first": int(i // num_experts), "second": int(i % num_experts),
                           "share": float(pairs.flat[i])} for i in order if pairs.flat[i] > 0],
        }
    return out


def domain_matrix(a: Mapping[str, np.ndarray], num_domains: int, num_experts: int) -> tuple[list, list]:
    """([domains][experts] fraction of each domain's tokens whose top-1 expert is e, [domains] token counts)."""
    top1 = a["expert_index"][:, 0].astype(np.int64)
    matrix, counts = [], []
    for d in range(num_domains):
        chosen = top1[a["domains"] == d]
        counts.append(int(chosen.size))
        matrix.append((np.bincount(chosen, minlength=num_experts) / max(chosen.size, 1)).tolist())
    return matrix, counts


def domain_information(matrix: Sequence[Sequence[float]], counts: Sequence[int]) -> float:
    """I(top-1 expert; domain), nats, from `domain_matrix`'s [domains][experts] shares and [domains]
    token counts (the joint distribution is share x count / total)."""
    return mutual_information(np.asarray(matrix, np.float64) * np.asarray(counts, np.float64)[:, None])


def trace(loaded: inference.LoadedModel, inputs: np.ndarray, targets: np.ndarray, *,
          domain_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
          domain_names: Sequence[str] | None = None, batch_size: int = 32) -> dict[str, Any]:
    """The trace of rows `inputs` [n, enc_len] / `targets` [n, dec_len] (definitions: module docstring).

    `domain_rows` = (inputs, targets, domain ids) of domain-labelled rows (`domain_examples`), traced
    separately for the domain matrix only; `domain_names` names the ids. Returns a JSON-ready dict:
    {'num_experts', 'top_k', 'ln_num_experts', 'eval_capacity_factor', 'rows',
     'layers': {layer: {...}}, 'health': {'thresholds', 'flags'}}.
    """
    if (domain_rows is None) != (domain_names is None):
        raise ValueError("trace: pass domain_rows and domain_names together")
    moe = loaded.config.moe
    num_experts = moe.num_experts
    layers: dict[str, _LayerTokens] = {}
    router: dict[str, list[float]] = {}
    _run(loaded, inputs, targets, np.full(len(inputs), -1, np.int32), batch_size, layers, router)
    domain_layers: dict[str, _LayerTokens] = {}
    if domain_rows is not None:
        _run(loaded, *domain_rows, batch_size, domain_layers, {})
    vocabulary = loaded.vocabulary
    out_layers = {}
    for layer in sorted(layers, key=lambda n: (not n.startswith("encoder"), moe_metrics._natural_key(n))):
        decoder = not layer.startswith("encoder")
        summary = _layer_summary(layers[layer].arrays(), num_experts, vocabulary, decoder, router[layer])
        if domain_rows is not None:
            summary["domain_matrix"], summary["domain_tokens"] = domain_matrix(
                domain_layers[layer].arrays(), len(domain_names), num_experts)
            summary["domain_information"] = domain_information(summary["domain_matrix"], summary["domain_tokens"])
        out_layers[layer] = summary
    thresholds = reporting.HealthThresholds()
    flags = reporting.health_flags({k: v["health"] for k, v in out_layers.items()}, num_experts, thresholds)
    return {
        "num_experts": num_experts, "top_k": moe.top_k if moe.router_type == "tokens_choose" else 1,
        "ln_num_experts": math.log(num_experts), "eval_capacity_factor": moe.eval_capacity_factor,
        "rows": int(len(inputs)), "domain_rows": 0 if domain_rows is None else int(len(domain_rows[0])),
        "domains": list(domain_names) if domain_rows is not None else None,
        "layers": out_layers,
        "health": {"thresholds": dataclasses.asdict(thresholds), "describe": thresholds.describe(),
                   "flags": [dataclasses.asdict(f) for f in flags],
                   "text": reporting.format_health(flags, out_layers, thresholds)},
    }


# ------------------------------------------------------------------------------ outputs


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_markdown(result: Mapping[str, Any], images: Mapping[str, str] | None = None) -> str:
    """report.md: setup, per-layer entropies, health flags, and per layer the top tokens of each
    expert, the domain matrix and the first/second-choice summary."""
    ln_e, num_experts = result["ln_num_experts"], result["num_experts"]
    meta = result.get("meta", {})
    lines = ["# Token trace", ""]
    if meta:
        lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += [f"- experts per layer: {num_experts} (ln E = {ln_e:.3f} nats), top-k {result['top_k']}, eval capacity "
              f"factor {result['eval_capacity_factor']}",
              f"- rows traced: {result['rows']}" + (f"; domain-labelled rows: {result['domain_rows']}"
                                                     if result.get("domains") else ""),
              "- tokens: real (non-padding) tokens; a decoder layer routes the decoder input tokens (targets "
              "shifted right, position 0 = <start>). Top-1 expert = the router's first choice (before capacity).",
              "", "## Entropy of the top-1 expert distribution (nats)", "",
              "H = -sum_e p_e ln p_e, p_e = share of the tokens of a kind whose top-1 expert is e "
              f"(ST-MoE Table 14). Uniform over the experts: ln E = {ln_e:.3f}.", "",
              "| layer | all tokens | sentinels | all / ln E | sentinels / ln E | tokens | sentinels |",
              "|---|---|---|---|---|---|---|"]
    for layer, s in result["layers"].items():
        lines.append(f"| {layer} | {_fmt(s['entropy_all'])} | {_fmt(s['entropy_sentinel'])} | "
                     f"{_fmt(s['entropy_all'] / ln_e)} | {_fmt(s['entropy_sentinel'] / ln_e)} | {s['tokens']} | "
                     f"{s['sentinel_tokens']} |")
    lines += ["", "## Routing health", "", "```", result["health"]["text"], "```", "",
              "| layer | first choices dropped | tokens reaching no expert | load CV | router entropy (nats) | "
              "router confidence |", "|---|---|---|---|---|---|"]
    for layer, s in result["layers"].items():
        h = s["health"]
        lines.append(f"| {layer} | {100 * h['dropped_fraction_rank1']:.2f}% | {100 * h['dropped_tokens']:.2f}% | "
                     f"{_fmt(h['load_cv'])} | {_fmt(h['router_entropy'])} | {_fmt(h['router_confidence'])} |")
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in images.items()]
    for layer, s in result["layers"].items():
        lines += ["", f"## {layer}", "", "### Most frequent tokens per expert (top-1)", "",
                  "| expert | share of tokens | tokens (count) |", "|---|---|---|"]
        for e in range(num_experts):
            tops = ", ".join(f"`{t['text']}` {t['count']}" for t in s["top_tokens"][str(e)]) or "(none)"
            lines.append(f"| {e} | {100 * s['top1_share_all'][e]:.1f}% | {tops} |")
        if "domain_matrix" in s:
            lines += ["", "### Expert-by-domain routing (share of each domain's tokens, top-1)", "",
                      "| domain | tokens | " + " | ".join(f"e{e}" for e in range(num_experts)) + " |",
                      "|---|---|" + "---|" * num_experts]
            for name, count, row in zip(result["domains"], s["domain_tokens"], s["domain_matrix"]):
                lines.append(f"| {name} | {count} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
            lines += ["", f"- I(top-1 expert; domain) = {_fmt(s['domain_information'])} nats of H(domain) = "
                      f"{_fmt(entropy(s['domain_tokens']))} (compare with the untrained model's: a random router already "
                      "sorts tokens by content)"]
        if "first_second" in s:
            f = s["first_second"]
            pairs = ", ".join(f"({p['first']}, {p['second']}) {100 * p['share']:.1f}%" for p in f["top_pairs"][:5])
            lines += ["", "### First vs second choice", "",
                      f"- first choice kept {100 * f['first_kept']:.1f}%, second choice wanted "
                      f"{100 * f['second_wanted']:.1f}%, kept {100 * f['second_kept']:.1f}% of tokens",
                      f"- I(first; second) = {_fmt(f['mutual_information'])} nats of H(second) = "
                      f"{_fmt(f['entropy_second'])} (0: the second choice ignores the first)",
                      f"- most frequent (first, second) pairs: {pairs}"]
    return "\n".join(lines) + "\n"


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return cols, math.ceil(n / cols)


def plot_entropy(result: Mapping[str, Any], path: str) -> str:
    """Bar chart: per layer, the top-1 entropy of all tokens and of sentinels, with the ln E line."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch under a notebook's inline plots

    names = list(result["layers"])
    x = np.arange(len(names))
    fig = Figure(figsize=(max(4.0, 1.3 * len(names) + 2), 3.5))
    ax = fig.subplots()
    ax.bar(x - 0.2, [result["layers"][n]["entropy_all"] for n in names], 0.4, label="all tokens")
    ax.bar(x + 0.2, [np.nan_to_num(result["layers"][n]["entropy_sentinel"]) for n in names], 0.4, label="sentinels")
    ax.axhline(result["ln_num_experts"], color="black", linestyle="--", linewidth=1,
               label=f"ln E = {result['ln_num_experts']:.2f} (uniform)")
    ax.set_xticks(x, [n.replace("/ffn", "") for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("entropy of top-1 expert (nats)")
    ax.set_ylim(0, result["ln_num_experts"] * 1.15)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Routing entropy per MoE layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _heatmaps(panels: Mapping[str, np.ndarray], path: str, title: str, ylabels: Sequence[str] | None,
              xlabel: str, ylabel: str, annotate: bool = False) -> str:
    """One heatmap panel per layer, a shared colour scale from 0."""
    from matplotlib.figure import Figure

    cols, rows = _grid(len(panels))
    height = 0.4 * next(iter(panels.values())).shape[0] + 1.2
    fig = Figure(figsize=(3.4 * cols + 1.0, height * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    vmax = max(float(np.max(m)) for m in panels.values()) or 1.0
    for index, (ax, (name, matrix)) in enumerate(zip(axes.flat, panels.items())):
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(name.replace("/ffn", ""), fontsize=9)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]), ylabels if ylabels is not None else range(matrix.shape[0]))
        ax.tick_params(labelsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        if index % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if annotate:
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, f"{value:.2f}"[1:] if value < 1 else "1", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 * vmax else "black")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90)
    return path


def _json_ready(value: Any) -> Any:
    """nan (an entropy over no tokens) -> None, so trace.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_outputs(result: Mapping[str, Any], out_dir: str) -> dict[str, str]:
    """Writes report.md, trace.json, entropy.png and (when present) domain_routing.png and
    expert_pairs.png to `out_dir`; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    images = {"entropy": plot_entropy(result, os.path.join(out_dir, "entropy.png"))}
    layers = result["layers"]
    if result.get("domains"):
        images["domain_routing"] = _heatmaps(
            {n: np.asarray(s["domain_matrix"]) for n, s in layers.items()}, os.path.join(out_dir, "domain_routing.png"),
            "Share of each domain's tokens per top-1 expert (rows sum to 1)", result["domains"], "expert", "domain",
            annotate=True)
    if any("first_second" in s for s in layers.values()):
        images["expert_pairs"] = _heatmaps(
            {n: np.asarray(s["first_second"]["pairs"]) for n, s in layers.items() if "first_second" in s},
            os.path.join(out_dir, "expert_pairs.png"), "Share of tokens per (first, second) expert choice",
            None, "second choice", "first choice")
    paths = {"trace_json": os.path.join(out_dir, "trace.json"), "report": os.path.join(out_dir, "report.md")}
    with open(paths["trace_json"], "w") as f:
        json.dump(_json_ready(result), f, indent=1, allow_nan=False)
    with open(paths["report"], "w") as f:
        f.write(format_markdown(result, {k: os.path.basename(v) for k, v in images.items()}))
    return {**paths, **images}
