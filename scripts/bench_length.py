"""Benchmark: S-GRPO's update against full-token GRPO and T-SPMO at realistic completion lengths.

    python scripts/bench_length.py                        # timing + profile; ~10-12 min alone on 2 CPU cores
    python scripts/bench_length.py --quick                # smoke run on builtin:tiny-random (seconds)
    python scripts/bench_length.py --accuracy             # the separate accuracy check (~20-25 min alone)
    python scripts/bench_length.py --plan                 # no model: what each candidate schedule implies

**What the timing part measures.** The embedded SmolLM2-135M-Instruct, CPU, float32, LoRA r=16 / alpha=32
on all linear layers, AdamW lr 2e-4, the same seed everywhere. For each completion length L in 32, 128,
256, ``--prompts`` GSM8K training problems (``task=gsm8k``: ``../shared/data/gsm8k_train.jsonl``) x G
completions are sampled **once** (temperature 1) and every algorithm updates on that same rollout, each in
its own child process (so peak memory belongs to one algorithm at one length):

* ``grpo``   full-token GRPO (``algo=grpo``): every completion token in the loss;
* ``sgrpo``  S-GRPO with a uniform schedule (``--uniform K,P,D``, default 8,0.3,1: decay 1, every later
  token kept with the same probability);
* ``sgrpo_decay``  S-GRPO with a decayed schedule (``--decayed K,P,D``, default 16,0.5,0.95, the library's
  default, ``train/config.py:SGRPOConfig``): later tokens kept with probability ``P·D^(t−K)``, so each row's
  last selected token, where its update is cropped, comes early
  (``frugal.train.token_selection.expected_last_position``);
* ``tspmo``  T-SPMO (``algo=tspmo``): branch points of each group's prefix trie.

*Completions forced to the target length.* GSM8K answers from a 135M model often end before 256 tokens;
so that every row really is L tokens, EOS is not allowed to end a row while these rollouts are sampled
(the decoding core's stop set is emptied, as ``min_new_tokens=L`` would do): rows that would have ended
keep sampling the model's own continuation. Where each row would have ended (its first EOS) is reported
as the "natural" length. *Rewards are synthetic* (each group: half 1, half 0, in a seeded order): a 135M
model solves almost no GSM8K problem, so real rewards would give zero advantages and an empty loss; cost
does not depend on which rows are right. The accuracy check below uses real rewards.

Per length and algorithm: the median **update** seconds over ``--repeats`` updates after one warm-up
update (token selection + ``frugal.train.update.update_policy``: micro-batched forward/backward over the
selected tokens, clip, AdamW; sampling excluded), the **whole-step** seconds (this length's sampling time,
measured once, + selection + update), the **peak RSS** of the child process (ru_maxrss: imports, model,
rollout and every update) and the update's own **peak RSS increase** over the RSS just before it (sampled
every 2 ms from /proc/self/statm, the largest over the timed updates; the warm-up update is excluded because
it also pages in the memory-mapped weights, ~0.5 GB; children run with a fixed glibc mmap threshold so
freed activations leave the RSS). The BENCH memory ratio uses this increase, since the process floor —
imports and weights — is the same for every algorithm. Also the **fraction of completion tokens in the loss**
and the **mean position of each row's last selected token** (0-based; the decoder runs each row up to it).

*Profile* (``--profile``, on by default): one more S-GRPO update with the decayed schedule at the longest
length, split into the decoder's forward passes (the shared prompt prefill and the cropped rows), the LM
head at the selected positions (+ log-softmax), the loss, the backward pass and the optimizer (grad clip +
AdamW), with timers around the same library calls ``update_policy`` makes.

**Accuracy** (``--accuracy``, a separate run): held-out greedy accuracy after the same ``--acc-steps``
steps of ``frugal train`` (the task recipe's own lr, LoRA and batch, the same for every algorithm) for grpo / sgrpo / sgrpo_decay (and tspmo with ``--acc-algos``) with seeds 0 and 1
(``--seeds``), real rewards, one child process per run; the spread between seeds is the noise. Default
task: the demo recipe (single-digit addition, where a 135M model's accuracy moves in a few steps) with
``--acc-max-new-tokens`` 128; its held-out split serves as the development split for choosing the schedule
(docs/benchmarks.md says how).

The timing part ends with exactly one line (ratios at the longest length; ``sgrpo`` there is the
*decayed* schedule, the library's default, and the uniform schedule's ratios are printed above it)::

    BENCH length sgrpo_vs_grpo_update_256=<r> sgrpo_vs_grpo_mem_256=<r> tspmo_vs_grpo_update_256=<r>

Run it alone: other jobs on the same cores collapse torch's threads and the timings with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("grpo", "sgrpo", "sgrpo_decay", "tspmo")
# The schedules docs/benchmarks.md weighs: uniform ones (one with the paper recipe's k_early), decayed ones.
CANDIDATES = ("8,0.3,1.0", "25,0.3,1.0", "8,0.5,0.95", "16,0.5,0.95", "25,0.5,0.95", "16,0.5,0.9")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct", help="HF id, local path or builtin:*")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="completion lengths in tokens (default 32 128 256; --quick: 8 16 24)")
    p.add_argument("--prompts", type=int, default=2, help="GSM8K prompts per rollout")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="completions per forward/backward (optim.micro_batch_size; 8 = one group)")
    p.add_argument("--bucket-overhead", type=int, default=None,
                   help="policy_loss.BUCKET_OVERHEAD for the updates (default: the library's; a diagnostic)")
    p.add_argument("--repeats", type=int, default=2, help="timed updates per algorithm and length (after 1 warm-up)")
    p.add_argument("--decayed", default="16,0.5,0.95", help="the decayed S-GRPO schedule: k_early,p_keep,decay")
    p.add_argument("--uniform", default="8,0.3,1.0", help="the uniform S-GRPO schedule (sgrpo): k_early,p_keep,decay")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"comma list of {','.join(ALGOS)}")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per child process")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled S-GRPO update")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: builtin:tiny-random, lengths 8 16 24, 1 repeat, accuracy 1 step (seconds)")
    p.add_argument("--accuracy", action="store_true", help="run the accuracy comparison instead of the timing")
    p.add_argument("--plan", action="store_true",
                   help="no model: print what each --candidates schedule implies (tokens in the loss, crop, "
                        "decoder positions with length buckets) at --lengths, and exit (seconds)")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="--plan: schedules k_early,p_keep,decay")
    p.add_argument("--acc-algos", default="grpo,sgrpo,sgrpo_decay")
    p.add_argument("--acc-steps", type=int, default=8)
    p.add_argument("--acc-max-new-tokens", type=int, default=128)
    p.add_argument("--acc-overrides", nargs="*", default=["recipe=demo"],
                   help="frugal train overrides for the accuracy task (default: the demo recipe)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="accuracy: seeds (their spread = noise)")
    p.add_argument("--workdir", default=None, help="rollouts, logs and run dirs (default outputs/bench_length/<time>)")
    p.add_argument("--json", default=None, help="write the summary here")
    # Internal: one child's job, its spec and its result file.
    p.add_argument("--child", choices=("sample", "update", "train"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.repeats, args.prompts, args.group = "builtin:tiny-random", 1, 2, 4
        args.acc_steps, args.seeds, args.acc_max_new_tokens = 1, [0], 16
        args.acc_overrides = ["model=tiny_random", "task.n_train=32", "task.n_test=4", "prompts_per_step=2",
                              "algo.group_size=4", "eval_limit=4"]
    args.lengths = args.lengths or ([8, 16, 24] if args.quick else [32, 128, 256])
    unknown = (set(args.algos.split(",")) | set(args.acc_algos.split(","))) - set(ALGOS)
    if unknown:
        p.error(f"--algos/--acc-algos: unknown {sorted(unknown)}; choose from {','.join(ALGOS)}")
    for flag, texts in (("--decayed", [args.decayed]), ("--uniform", [args.uniform]), ("--candidates", args.candidates)):
        for text in texts:
            try:
                parse_schedule(text)
            except ValueError as e:
                p.error(f"{flag} {text!r}: {e}")
    args.decayed_schedule = parse_schedule(args.decayed)
    args.uniform_schedule = parse_schedule(args.uniform)
    if args.repeats < 1 or args.prompts < 1 or args.group < 2 or min(args.lengths) < 1:
        p.error("--repeats and --prompts must be >= 1, --group >= 2, every --lengths value >= 1")
    return args


def parse_schedule(text: str) -> dict:
    """``"K,P,D"`` -> ``{"k_early": K, "p_keep": P, "decay": D}``, checked by ``SGRPOConfig``."""
    from frugal.train.config import SGRPOConfig

    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError("expected three comma-separated values k_early,p_keep,decay")
    knobs = {"k_early": int(parts[0]), "p_keep": float(parts[1]), "decay": float(parts[2])}
    SGRPOConfig(**knobs)  # range checks, with the config's own messages
    return knobs


def algo_config(name: str, args, group: int):
    """The algorithm's config dataclass, as ``frugal train algo=...`` would build it."""
    import frugal.train.config  # noqa: F401  (registers the algorithms)
    from frugal.runtime.config import make_variant

    knobs = {"group_size": group, "beta": 0.0, "num_iterations": 1}
    if name.startswith("sgrpo"):
        return make_variant("algo", "sgrpo", **knobs, **schedule(name, args))
    return make_variant("algo", name, **knobs)


def algo_overrides(name: str, args) -> list[str]:
    """The same algorithm as ``frugal train`` overrides (accuracy runs)."""
    if name.startswith("sgrpo"):
        return ["algo=sgrpo"] + [f"algo.{k}={v}" for k, v in schedule(name, args).items()]
    return [f"algo={name}"]


def schedule(name: str, args) -> dict:
    """The S-GRPO schedule an algorithm key stands for: ``sgrpo`` uniform, ``sgrpo_decay`` decayed."""
    return args.decayed_schedule if name == "sgrpo_decay" else args.uniform_schedule


# ---------------------------------------------------------------------- shared helpers

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def rss_watch(period_s: float = 0.002):
    """The highest current RSS seen while the block runs minus the RSS at its start (MB), in ``out["mb"]``.
    ru_maxrss cannot give this: it is the process's high-water mark, which loading may already have set."""
    out, stop = {"mb": 0.0}, threading.Event()
    start = current_rss_mb()
    high = [start]

    def watch():
        while not stop.is_set():
            high[0] = max(high[0], current_rss_mb())
            stop.wait(period_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["mb"] = max(high[0], current_rss_mb()) - start


def load_policy(args):
    """The model with the same seeded LoRA init in every child."""
    import torch

    from frugal.train.lora import LoraConfig, apply_lora
    from frugal.inference.models import ModelConfig, load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name_or_path=args.model, dtype="float32"), torch.device("cpu"))
    torch.manual_seed(args.seed)
    model = apply_lora(model, LoraConfig(r=args.rank, alpha=args.alpha, dropout=0.0, target_modules=["all-linear"]))
    return model, tok


def train_config(args, algo: str, group: int):
    from frugal.train.config import OptimConfig, TrainConfig

    return TrainConfig(algo=algo_config(algo, args, group),
                       optim=OptimConfig(lr=args.lr, warmup_steps=0, schedule="cosine", max_grad_norm=1.0,
                                         micro_batch_size=args.micro_batch),
                       max_steps=args.repeats + 2, seed=args.seed)


def synthetic_rewards(n_rows: int, group: int, seed: int) -> list[float]:
    """Half of each group right (1), half wrong (0), in a seeded order: every group has reward variance."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rewards = []
    for _ in range(n_rows // group):
        base = torch.tensor([1.0] * (group // 2) + [0.0] * (group - group // 2))
        rewards += base[torch.randperm(group, generator=gen)].tolist()
    return rewards


def last_positions(selection, n_rows: int):
    """Each row's last selected completion position (-1: none selected)."""
    import torch

    return torch.full((n_rows,), -1, dtype=torch.long).scatter_reduce(0, selection.rows, selection.positions,
                                                                     reduce="amax")


# ---------------------------------------------------------------------- children

def child_sample(spec: dict, args) -> dict:
    """Sample ``prompts x G`` completions of exactly ``length`` tokens once and save the rollout."""
    from unittest import mock

    import torch

    from frugal.tasks import load_task
    from frugal.tasks.config import TaskConfig
    from frugal.inference import decoding
    from frugal.train.rollout import GenerationConfig, generate
    from frugal.train.schedule import batch_for_step

    model, tok = load_policy(args)
    data = load_task(TaskConfig(name="gsm8k") if not args.quick else TaskConfig(name="arith", n_train=32, n_test=4))
    rows = batch_for_step(data.train, 1, args.prompts, args.seed)
    length = spec["length"]
    cfg = GenerationConfig(max_new_tokens=length, temperature=1.0, top_p=1.0, top_k=0,
                           batch_size=args.prompts * args.group)
    eos = decoding.eos_token_ids(model, tok)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    # No stop token: every row runs to `length` (what min_new_tokens=length does in transformers).
    with mock.patch.object(decoding, "eos_token_ids", lambda *a, **kw: []):
        rollout = generate(model, tok, [r["prompt"] for r in rows], cfg, num_samples=args.group)
    sample_s = time.perf_counter() - t0
    is_eos = torch.isin(rollout.completion_ids, torch.tensor(eos))
    natural = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], length, dtype=torch.long))
    torch.save({"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                "completion_ids": rollout.completion_ids, "completion_mask": rollout.completion_mask,
                "texts": rollout.texts, "group_size": rollout.group_size}, spec["rollout"])
    return {"sample_s": sample_s, "prompt_tokens": int(rollout.prompt_mask[:: args.group].sum()),
            "completion_tokens": int(rollout.completion_mask.sum()), "rows": len(rollout.texts),
            "natural_length_mean": float(natural.float().mean()), "natural_ended": int(is_eos.any(1).sum()),
            "peak_rss_mb": peak_rss_mb()}


def child_update(spec: dict, args) -> dict:
    """Time 1 + ``repeats`` updates of one algorithm on the saved rollout; optionally profile one more."""
    import torch

    from frugal.train.update import select_tokens, update_policy
    from frugal.train.advantages import group_advantages
    from frugal.train.rollout import Rollout
    from frugal.train.schedule import make_scheduler

    if args.bucket_overhead is not None:  # what one more decoder call is assumed to cost, in padded columns
        from frugal.train import policy_loss

        policy_loss.BUCKET_OVERHEAD = args.bucket_overhead
    model, _ = load_policy(args)
    rollout = Rollout(**torch.load(spec["rollout"]))
    n, group = rollout.completion_ids.shape[0], rollout.group_size
    cfg = train_config(args, spec["algo"], group)
    rewards = synthetic_rewards(n, group, args.seed)
    adv = group_advantages(torch.tensor(rewards), group, cfg.algo.adv_eps, True).advantages
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2))
    scheduler = make_scheduler(optimizer, cfg)
    rss_floor = peak_rss_mb()
    select_s, update_s, update_mb, fractions, lasts, tokens = [], [], [], [], [], int(rollout.completion_mask.sum())
    for rep in range(1 + args.repeats):
        torch.manual_seed(args.seed * 1_000_003 + rep)  # S-GRPO draws its selection from the global stream
        t0 = time.perf_counter()
        selection = select_tokens(cfg, rollout, rewards, adv)
        t1 = time.perf_counter()
        with rss_watch() as mem:
            update_policy(model, optimizer, scheduler, rollout, selection, cfg)
        t2 = time.perf_counter()
        select_s.append(t1 - t0)
        update_s.append(t2 - t1)
        update_mb.append(mem["mb"])
        fractions.append(len(selection) / tokens)
        last = last_positions(selection, n)
        lasts.append(float(last[last >= 0].float().mean()) if (last >= 0).any() else float("nan"))
    result = {"select_s": select_s, "update_s": update_s, "update_rss_mb": update_mb,
              "selected_frac": statistics.mean(fractions), "last_pos_mean": statistics.mean(lasts),
              "rss_before_update_mb": rss_floor, "peak_rss_mb": peak_rss_mb()}
    if spec.get("profile"):
        result["profile"] = profile_update(model, optimizer, rollout, cfg, rewards, adv)
    return result


def profile_update(model, optimizer, rollout, cfg, rewards, adv) -> dict:
    """One update split by phase, with timers around the calls ``update_policy`` makes (one pass, beta = 0):
    per micro-batch ``selected_logprobs`` (decoder forward: the shared prompt prefill and the cropped rows,
    by hooks on the decoder; LM head at the selected positions + log-softmax: the rest of the call), the
    clipped loss, ``backward``; then grad clip and AdamW."""
    import torch

    from frugal.train.policy_loss import clipped_pg_loss, decoder_and_head, selected_logprobs
    from frugal.train.update import row_chunks, select_tokens

    decoder, _ = decoder_and_head(model)
    calls, starts = [], []
    pre = decoder.register_forward_pre_hook(lambda m, a, kw: starts.append(time.perf_counter()), with_kwargs=True)
    post = decoder.register_forward_hook(  # (attention-mask shape = rows x columns up to the crop, ids, seconds)
        lambda m, a, kw, out: calls.append((kw["attention_mask"].shape, kw["input_ids"].shape,
                                            time.perf_counter() - starts.pop())), with_kwargs=True)
    columns = 0  # token positions the decoder ran for the rows (the prompt prefill aside)
    timers = {"decoder_prefill_s": 0.0, "decoder_rows_s": 0.0, "head_and_logsoftmax_s": 0.0, "loss_s": 0.0,
              "backward_s": 0.0, "clip_s": 0.0, "optimizer_s": 0.0}
    try:
        torch.manual_seed(12345)
        model.train()
        selection = select_tokens(cfg, rollout, rewards, adv)
        ids, mask, width = rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1]
        total = max(len(selection), 1)
        optimizer.zero_grad(set_to_none=True)
        t_all = time.perf_counter()
        for sel in row_chunks(selection, cfg.optim.micro_batch_size):
            calls.clear()
            t0 = time.perf_counter()
            logp = selected_logprobs(model, ids, mask, width, sel)
            t1 = time.perf_counter()
            prefill = sum(s for shape, _, s in calls if shape[1] == width - 1)  # the prompt (all but its last token)
            rows = sum(s for shape, _, s in calls if shape[1] != width - 1)
            columns += sum(i[0] * i[1] for shape, i, _ in calls if shape[1] != width - 1)
            timers["decoder_prefill_s"] += prefill
            timers["decoder_rows_s"] += rows
            timers["head_and_logsoftmax_s"] += (t1 - t0) - prefill - rows
            out = clipped_pg_loss(logp, None, None, sel.advantages, cfg.algo.clip_low, cfg.algo.clip_high,
                                  normalizer=total)
            t2 = time.perf_counter()
            out.loss.backward()
            t3 = time.perf_counter()
            timers["loss_s"] += t2 - t1
            timers["backward_s"] += t3 - t2
        params = [p for p in model.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        timers["clip_s"], timers["optimizer_s"] = t1 - t0, t2 - t1
        timers["total_s"] = t2 - t_all
        last = last_positions(selection, rollout.completion_ids.shape[0])
        # Uncropped, each row in the loss would run its whole completion (+ the prompt's last token).
        timers.update(decoder_columns=columns, decoder_columns_uncropped=int((last >= 0).sum()) * (
            rollout.completion_ids.shape[1] + 1))
        timers.update(selected=len(selection), rows_in_loss=int((last >= 0).sum()),
                      last_pos_mean=float(last[last >= 0].float().mean()), length=rollout.completion_ids.shape[1])
    finally:
        pre.remove()
        post.remove()
    return timers


def child_train(spec: dict, args) -> dict:
    """One ``frugal train`` run (accuracy check): held-out accuracy before and after."""
    from hydra import compose, initialize_config_dir

    from frugal.conf import CONF_DIR
    from frugal.recipes.train import run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=spec["overrides"])
    summary = run(cfg, run_dir=Path(spec["run_dir"]))
    return {"accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
            "minutes": summary["minutes"], "peak_rss_mb": peak_rss_mb()}


def run_child(args) -> None:
    spec = json.loads(Path(args.spec).read_text())
    job = {"sample": child_sample, "update": child_update, "train": child_train}[args.child]
    t0 = time.time()
    result = job(spec, args)
    result["wall_s"] = time.time() - t0
    tmp = Path(spec["out"] + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, spec["out"])  # atomic: the parent reads the whole result or none


# ---------------------------------------------------------------------- the parent

def plan(args, draws: int = 100) -> dict:
    """What each candidate schedule implies at each length, without a model: the expected share of tokens in
    the loss, the expected crop ((E[last] + 1) / L), and, simulated with the library's own selection and
    length buckets (``--group`` rows per micro-batch, prompt shared), the decoder positions computed as a
    share of GRPO's and the decoder calls per micro-batch. Counts, not timings."""
    import torch

    from frugal.train.policy_loss import length_buckets
    from frugal.train.token_selection import expected_keep_fraction, expected_last_position, select_stochastic

    gen = torch.Generator().manual_seed(args.seed)
    out = {}
    for text in args.candidates:
        knobs = parse_schedule(text)
        k, p, d = knobs["k_early"], knobs["p_keep"], knobs["decay"]
        cells = []
        for length in sorted(args.lengths):
            computed, calls = 0, 0
            for _ in range(draws):
                sel = select_stochastic(torch.ones(args.group, length, dtype=torch.long), torch.ones(args.group),
                                        k, p, d, generator=gen)
                last = last_positions(sel, args.group).tolist()  # a row runs from the prompt's last token to here
                buckets = length_buckets(last)
                calls += len(buckets)
                computed += sum(len(b) * (max(last[i] for i in b) + 1) for b in buckets)
            cells.append({"length": length, "keep_frac": expected_keep_fraction(length, k, p, d),
                          "crop": (expected_last_position(length, k, p, d) + 1) / length,
                          "decoder_vs_grpo": computed / (draws * args.group * length), "calls": calls / draws})
        out[text] = cells
        print(f"{text:14s} " + " | ".join(
            f"L={c['length']}: loss {100 * c['keep_frac']:3.0f}%, crop {100 * c['crop']:3.0f}%, decoder "
            f"{c['decoder_vs_grpo']:.2f}x GRPO ({c['calls']:.1f} calls)" for c in cells))
    return out


def launch(kind: str, name: str, spec: dict, args, workdir: Path) -> dict:
    """Run one child (this script with --child) and return its result; its log stays in ``workdir``."""
    out, spec_path, log_path = workdir / f"{name}.json", workdir / f"{name}.spec.json", workdir / f"{name}.log"
    spec = {**spec, "out": str(out)}
    spec_path.write_text(json.dumps(spec))
    # A fixed mmap threshold: glibc then serves every block >= 64 KiB (all activations) with its own mapping
    # and returns it to the OS when freed, so the RSS seen during an update is its live memory, not memory an
    # earlier update freed but the heap kept (with the default, adaptive threshold it often is).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *forwarded_argv(args), "--child", kind, "--spec", str(spec_path)]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"child {name!r} failed (exit {proc.returncode}); log {log_path}:\n{log_path.read_text()[-4000:]}")
    return json.loads(out.read_text())


def forwarded_argv(args) -> list[str]:
    argv = ["--model", args.model, "--prompts", str(args.prompts), "--group", str(args.group),
            "--micro-batch", str(args.micro_batch), "--repeats", str(args.repeats), "--decayed", args.decayed,
            "--uniform", args.uniform,
            "--lr", repr(args.lr), "--rank", str(args.rank), "--alpha", str(args.alpha), "--seed", str(args.seed),
            "--threads", str(args.threads)]
    argv += ["--bucket-overhead", str(args.bucket_overhead)] if args.bucket_overhead is not None else []
    return argv + (["--quick"] if args.quick else [])


def median(values: list[float]) -> float:
    """Median after the warm-up update (the first pays one-off allocator and kernel costs)."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def run_timing(args, workdir: Path) -> dict:
    algos = [a for a in ALGOS if a in args.algos.split(",")]
    longest = max(args.lengths)
    results = {}
    for length in sorted(args.lengths):
        rollout = workdir / f"rollout_{length}.pt"
        sample = launch("sample", f"sample_{length}", {"length": length, "rollout": str(rollout)}, args, workdir)
        print(f"L={length}: sampled {sample['rows']} x {length} tokens in {sample['sample_s']:.1f} s "
              f"(prompts {sample['prompt_tokens']} tokens; {sample['natural_ended']} rows would have ended, "
              f"natural length {sample['natural_length_mean']:.0f} on average)", flush=True)
        results[length] = {"sample": sample}
        for algo in algos:
            profile = args.profile and algo == "sgrpo_decay" and length == longest
            r = launch("update", f"{algo}_{length}", {"length": length, "rollout": str(rollout), "algo": algo,
                                                      "profile": profile}, args, workdir)
            r["median_update_s"] = median(r["update_s"])
            r["median_select_s"] = median(r["select_s"])
            r["step_s"] = sample["sample_s"] + r["median_select_s"] + r["median_update_s"]
            r["update_peak_rss_mb"] = max(r["update_rss_mb"][1:] or r["update_rss_mb"])  # warm-up excluded
            results[length][algo] = r
            print(f"  {algo:11s} update {r['median_update_s']:7.2f} s | step {r['step_s']:7.2f} s | "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB (update +{r['update_peak_rss_mb']:5.0f} MB) | "
                  f"loss on {100 * r['selected_frac']:5.1f}% of tokens | last selected at "
                  f"{r['last_pos_mean']:6.1f} ({100 * (r['last_pos_mean'] + 1) / length:3.0f}% of L)", flush=True)
        rollout.unlink(missing_ok=True)
    return results


def ratios(results: dict, length: int) -> dict:
    at = results.get(length, {})

    def r(a: str, key: str) -> float:
        return at[a][key] / at["grpo"][key] if a in at and "grpo" in at and at["grpo"][key] else float("nan")

    return {f"{a}_vs_grpo_{what}": r(a, key) for a in ("sgrpo", "sgrpo_decay", "tspmo")
            for what, key in (("update", "median_update_s"), ("step", "step_s"), ("mem", "update_peak_rss_mb"),
                              ("rss", "peak_rss_mb"))}


def print_profile(results: dict) -> None:
    for length, at in results.items():
        prof = at.get("sgrpo_decay", {}).get("profile")
        if not prof:
            continue
        print(f"profile: one S-GRPO update (decayed schedule) at L={length}: {prof['selected']} tokens selected "
              f"in {prof['rows_in_loss']} rows, last selected at {prof['last_pos_mean']:.1f} on average; the decoder "
              f"ran {prof['decoder_columns']} row positions of {prof['decoder_columns_uncropped']} uncropped "
              f"({prof['decoder_columns'] / max(prof['decoder_columns_uncropped'], 1):.2f}x, bucket padding included)")
        total = prof["total_s"]
        for key in ("decoder_prefill_s", "decoder_rows_s", "head_and_logsoftmax_s", "loss_s", "backward_s",
                    "clip_s", "optimizer_s"):
            print(f"  {key[:-2]:22s} {prof[key]:8.3f} s  {100 * prof[key] / total:5.1f}%")
        print(f"  {'total':22s} {total:8.3f} s")


def run_accuracy(args, workdir: Path) -> dict:
    algos = [a for a in ALGOS if a in args.acc_algos.split(",")]
    runs = {}
    for algo in algos:
        for seed in args.seeds:
            run_dir = workdir / f"train_{algo}_{seed}"
            overrides = [*args.acc_overrides, *algo_overrides(algo, args), "logger=none", f"seed={seed}",
                         f"model.name_or_path={args.model}", f"max_steps={args.acc_steps}", "max_minutes=null",
                         "save_every=0", "samples_every=0", f"generation.max_new_tokens={args.acc_max_new_tokens}",
                         f"num_threads={args.threads}"]
            r = runs[f"{algo}/{seed}"] = launch("train", f"train_{algo}_{seed}",
                                                {"overrides": overrides, "run_dir": str(run_dir)}, args, workdir)
            print(f"  {algo:11s} seed {seed}: accuracy {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} "
                  f"({r['minutes']:.1f} min)", flush=True)
    summary = {}
    for algo in algos:
        after = [runs[f"{algo}/{s}"]["accuracy_after"] for s in args.seeds]
        summary[algo] = {"mean": statistics.mean(after), "seeds": after,
                         "spread": max(after) - min(after)}
        print(f"  {algo:11s} held-out accuracy after {args.acc_steps} steps: mean {summary[algo]['mean']:.3f} "
              f"(seeds {', '.join(f'{a:.3f}' for a in after)}; spread {summary[algo]['spread']:.3f})")
    return {"runs": runs, "summary": summary}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    workdir = Path(args.workdir or ROOT / "outputs" / "bench_length" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if not args.plan:
        workdir.mkdir(parents=True, exist_ok=True)
    print(f"bench_length: model={args.model} lengths={args.lengths} prompts={args.prompts} G={args.group} "
          f"micro_batch={args.micro_batch} repeats={args.repeats}+1 warm-up decayed={args.decayed_schedule} "
          f"lr={args.lr} lora=r{args.rank}/a{args.alpha} threads={args.threads} seed={args.seed} "
          f"load={os.getloadavg()[0]:.2f} workdir={workdir}", flush=True)
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "spec")}, "workdir": str(workdir)}
    if args.plan:
        summary["plan"] = plan(args)
    elif args.accuracy:
        summary["accuracy"] = run_accuracy(args, workdir)
    else:
        results = summary["results"] = run_timing(args, workdir)
        longest = max(args.lengths)
        summary["ratios"] = {length: ratios(results, length) for length in sorted(args.lengths)}
        for length, rs in summary["ratios"].items():
            print(f"L={length}: update vs GRPO: sgrpo {rs['sgrpo_vs_grpo_update']:.3f}x, sgrpo_decay "
                  f"{rs['sgrpo_decay_vs_grpo_update']:.3f}x, tspmo {rs['tspmo_vs_grpo_update']:.3f}x; update memory: "
                  f"sgrpo {rs['sgrpo_vs_grpo_mem']:.3f}x, sgrpo_decay {rs['sgrpo_decay_vs_grpo_mem']:.3f}x, "
                  f"tspmo {rs['tspmo_vs_grpo_mem']:.3f}x; process peak RSS: sgrpo_decay "
                  f"{rs['sgrpo_decay_vs_grpo_rss']:.3f}x")
        print_profile(results)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        from frugal.runtime.io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(summary, indent=2, default=str))
    if not (args.accuracy or args.plan):
        at = summary["ratios"][longest]
        print(f"BENCH length sgrpo_vs_grpo_update_{longest}={at['sgrpo_decay_vs_grpo_update']:.3f} "
              f"sgrpo_vs_grpo_mem_{longest}={at['sgrpo_decay_vs_grpo_mem']:.3f} "
              f"tspmo_vs_grpo_update_{longest}={at['tspmo_vs_grpo_update']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
