"""The RL loop of ``m1 rl``: prompts -> rollouts -> rewards -> group advantages -> update rounds, with
metrics, held-out evaluation and Orbax checkpoints.

One step: ``prompts.batch_size`` prompts, each sampled ``rollout.group_size`` times through the compiled
``generate`` (:func:`m1_jax.rl.rollout.rollout`); M1's repetition stop cuts responses; each response is scored
by the reward; with dynamic sampling, groups whose rewards are all equal are dropped and refilled from further
rollout batches (at most ``rollout.max_rollouts``; rows still missing are left out of the update by a zero
mask, so the update's shape never changes); advantages are normalised within each group; then
``rl.update_rounds`` optimizer steps on the batch (the first on-policy, the rest off-policy, which is where the
objectives differ). The rollout seed of step ``s`` is a function of ``rollout.seed`` and ``s``, so a resumed run
samples what the uninterrupted run would have.

``WORKDIR/metrics.jsonl`` gets one JSON object per step: ``reward_mean``, ``pass_rate``, ``response_length``,
the update's (last round) ``clip_fraction``, ``approx_kl`` (old || new), ``entropy``, ``loss``,
``grad_norm``, ``groups_kept``, ``rollouts``, ``rollout_s``, ``update_s``, ``rollout_tokens_per_s``,
``update_tokens_per_s``; ``consistency`` (the Pearson correlation of the behaviour log-probs and the update
step's log-probs of the same tokens before any update on them, the MiniMax-M1 report's figure 3) on the first
step and every ``train.consistency_every``; ``eval_pass_rate`` where the held-out set was scored.
Checkpoints (:class:`m1_jax.checkpoint.Checkpointer`) hold the policy and optimizer state, the prompt stream's
position and the step; ``--resume`` continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from tqdm.auto import tqdm

from m1_jax import sharding, train
from m1_jax.checkpoint import Checkpointer
from m1_jax.data import get_tokenizer
from m1_jax.generation import generate
from m1_jax.loading import from_pretrained
from m1_jax.model import M1Model, init_model
from m1_jax.presets import resolve_config
from m1_jax.rl.config import RL_RESUME_FIXED_FIELDS, RLRunConfig
from m1_jax.rl.consistency import logprob_agreement
from m1_jax.rl.data import PromptStream, Records, encode_all, reward_view
from m1_jax.rl.objectives import OBJECTIVES, flat_group_advantages
from m1_jax.rl.rewards import get_reward
from m1_jax.rl.rollout import PAD, Rollout, rollout, to_update_batch
from m1_jax.rl.rollout_filters import informative_groups, repetition_stop
from m1_jax.rl.tasks import TASK_PREFIX
from m1_jax.rl.update import UpdateOptions, build_policy_state
from m1_jax.rl.warmup import warm_up
from m1_jax.train_loop import TrainingError, check_resumable, metrics_file, run_workdir, save_last

log = logging.getLogger(__name__)

ROW_MULTIPLE = 16  # update rows are padded to a multiple of this many tokens (few compiled shapes)
EVAL_CHUNK = 256  # held-out prompts generated together


@dataclasses.dataclass
class RLSummary:
    steps: int = 0
    start_step: int = 0
    records: list[dict] = dataclasses.field(default_factory=list)  # the metrics of each step run
    eval_before: float | None = None
    eval_after: float | None = None
    init: str = ""  # what the policy started from
    wall_s: float = 0.0
    checkpoint_step: int | None = None
    damaged: dict[int, str] = dataclasses.field(default_factory=dict)
    policy: object = None  # the PolicyState at the end


class Scorer:
    """Rewards of decoded responses, and the held-out pass rate of a model (greedy)."""

    def __init__(self, run: RLRunConfig, tokenizer, rows_multiple: int = 1):
        self.reward = get_reward(run.rollout.reward)
        self.tokenizer, self.threshold = tokenizer, run.rollout.pass_threshold
        self.eos = tokenizer.eos_token_id
        self.rows_multiple = rows_multiple  # a sharded model generates for a multiple of its batch axes' size
        self.workers = run.rollout.reward_workers

    def scores(self, responses: list[list[int]], records: list[dict]) -> np.ndarray:
        def score(i: int) -> float:
            return self.reward(self.tokenizer.decode(responses[i]), reward_view(records[i]))

        if self.workers == 1:
            return np.array([score(i) for i in range(len(responses))], np.float64)
        with ThreadPoolExecutor(self.workers) as pool:
            return np.array(list(pool.map(score, range(len(responses)))), np.float64)

    def pass_rate(self, model: M1Model, records: list[dict], prompts: list[list[int]], max_new_tokens: int) -> float:
        passed, chunk = 0, -(-EVAL_CHUNK // self.rows_multiple) * self.rows_multiple
        for i in range(0, len(prompts), chunk):
            part = prompts[i:i + chunk]
            padded = part + [part[-1]] * (-len(part) % self.rows_multiple)  # extra rows, scored by no one
            out = np.asarray(generate(model, padded, max_new_tokens=max_new_tokens, eos_token_id=self.eos))
            passed += int(np.sum(self.scores([row.tolist() for row in out[:len(part)]], records[i:i + chunk])
                                 >= self.threshold))
        return passed / len(prompts)


def _row_length(prompts: list[list[int]], max_new_tokens: int) -> int:
    need = max(len(p) for p in prompts) + max_new_tokens
    return -(-need // ROW_MULTIPLE) * ROW_MULTIPLE


def _cut(r: Rollout, ends: np.ndarray) -> int:
    """Ends each row's response at ``ends`` (exclusive index into the row); returns how many rows it cut."""
    cut = 0
    for n, end in enumerate(ends):
        stop = int(r.prompt_lengths[n] + r.response_lengths[n])
        if end < stop:
            r.tokens[n, end:stop] = PAD
            r.response_mask[n, end:stop] = 0.0
            r.logprobs[n, end:stop] = 0.0
            r.response_lengths[n] = end - r.prompt_lengths[n]
            cut += 1
    return cut


def _concat(parts: list[Rollout], group_size: int, width: int) -> Rollout:
    """The rows of ``parts`` in one rollout, each padded to ``width`` tokens."""
    def joined(field):
        arrays = [getattr(p, field) for p in parts]
        return np.concatenate([a if a.ndim == 1 else np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays])

    cat = {f: joined(f) for f in ("tokens", "response_mask", "logprobs", "prompt_lengths", "response_lengths")}
    n = cat["tokens"].shape[0]
    return Rollout(**cat, group=np.arange(n, dtype=np.int32) // group_size, group_size=group_size)


class Sampler:
    """One step's update batch: rollouts, repetition stop, rewards, dynamic sampling, advantages."""

    def __init__(self, run: RLRunConfig, stream: PromptStream, scorer: Scorer):
        self.run, self.stream, self.scorer = run, stream, scorer
        ds = run.rollout.dynamic_sampling
        self.dynamic = OBJECTIVES[run.rl.objective].dynamic_sampling if ds == "auto" else ds == "on"

    def step(self, model: M1Model, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        ro, P, G = self.run.rollout, self.run.prompts.batch_size, self.run.rollout.group_size
        kept: list[tuple[Rollout, np.ndarray]] = []  # (rows of one group, their rewards)
        all_raw, lengths, cuts, attempts, tokens, width = [], [], 0, 0, 0, 0
        while attempts < (ro.max_rollouts if self.dynamic else 1) and len(kept) < P:
            batch = self.stream.batch(P)
            records, prompts = [b[0] for b in batch], [b[1] for b in batch]
            r = rollout(model, prompts, group_size=G, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                        top_p=None if ro.top_p >= 1.0 else ro.top_p, seed=_seed(ro.seed, step, attempts),
                        eos_token_id=self.scorer.eos, length=_row_length(prompts, ro.max_new_tokens))
            attempts += 1
            tokens += int(r.response_lengths.sum())
            width = max(width, r.tokens.shape[1])
            if ro.repetition_stop:
                ends = repetition_stop(np.exp(r.logprobs), r.response_mask, run_length=ro.repetition_stop)
                cuts += _cut(r, ends)
            raw = self.scorer.scores(r.responses(), [records[int(g)] for g in r.group])
            rewards = raw.copy()
            if ro.overlong_penalty:
                truncated = (r.response_lengths >= ro.max_new_tokens) & ~_ends_with_eos(r, self.scorer.eos)
                rewards -= ro.overlong_penalty * truncated
            all_raw.append(raw)
            lengths.append(r.response_lengths)
            keep = informative_groups(rewards.reshape(P, G)) if self.dynamic else np.ones(P, bool)
            for g in np.flatnonzero(keep)[: P - len(kept)]:
                rows = slice(g * G, (g + 1) * G)
                kept.append((_rows(r, rows), rewards[rows]))
        missing = P - len(kept)
        batch = None
        if kept:
            rewards = np.concatenate([k[1] for k in kept])
            adv = np.asarray(flat_group_advantages(rewards, G, scale_by_std=self.run.rl.scale_by_std))
            batch = to_update_batch(_concat([k[0] for k in kept], G, width), adv)
        batch = _pad_groups(batch, missing * G, width)
        raw = np.concatenate(all_raw)
        metrics = {"reward_mean": float(np.mean(raw)), "pass_rate": float(np.mean(raw >= self.scorer.threshold)),
                   "response_length": float(np.mean(np.concatenate(lengths))), "groups_kept": P - missing,
                   "rollouts": attempts, "repetition_stops": cuts, "sampled_tokens": tokens}
        return batch, metrics


def _rows(r: Rollout, rows: slice) -> Rollout:
    return Rollout(tokens=r.tokens[rows], response_mask=r.response_mask[rows], logprobs=r.logprobs[rows],
                   prompt_lengths=r.prompt_lengths[rows], response_lengths=r.response_lengths[rows],
                   group=r.group[rows], group_size=r.group_size)


def _ends_with_eos(r: Rollout, eos: int) -> np.ndarray:
    last = r.prompt_lengths + r.response_lengths - 1
    return r.tokens[np.arange(r.tokens.shape[0]), np.maximum(last, 0)] == eos


def _pad_groups(batch: dict | None, rows: int, length: int) -> dict:
    """``batch`` with ``rows`` more rows that take no part in the update (zero mask and advantage), and all
    rows padded to the longest row length among the parts."""
    parts = [] if batch is None else [batch]
    if rows:
        parts.append({"tokens": np.full((rows, length), PAD, np.int32),
                      "loss_mask": np.zeros((rows, length), np.float32),
                      "old_logprobs": np.zeros((rows, length), np.float32),
                      "advantages": np.zeros((rows,), np.float32)})
    L = max(p["tokens"].shape[1] for p in parts)
    out = {}
    for k in parts[0]:
        arrays = [p[k] if p[k].ndim == 1 else np.pad(p[k], ((0, 0), (0, L - p[k].shape[1]))) for p in parts]
        out[k] = np.concatenate(arrays)
    return out


def _seed(seed: int, step: int, attempt: int) -> int:
    return int(np.random.default_rng([seed, step, attempt]).integers(0, 2 ** 31 - 1))


# ----------------------------------------------------------------------------------- setup
def initial_model(run: RLRunConfig, workdir: str, init_from: str | None, progress: bool) -> tuple[M1Model, str]:
    """The policy to start from -> (model, what it is): ``init_from``; else the warm-up (``warmup.steps`` > 0,
    ``task:`` prompts); else the preset ``model.config`` randomly initialised."""
    options = train.model_options(run)
    if init_from:
        return from_pretrained(init_from, **options), init_from
    if run.warmup.steps:
        if not run.prompts.source.startswith(TASK_PREFIX):
            raise ValueError(f"warmup.steps={run.warmup.steps}: the supervised warm-up needs a generated task "
                             f"(prompts.source task:NAME), not {run.prompts.source!r}; give --init-from instead")
        path = warm_up(run, workdir, progress=progress)
        return from_pretrained(path, **options), f"{path} (supervised warm-up, {run.warmup.steps} steps)"
    cfg = resolve_config(run.model.config)
    log.warning("m1 rl: starting from a randomly initialised %s model (no --init-from, no warm-up)", run.model.config)
    return init_model(cfg, seed=run.model.seed, **options), f"{run.model.config} (random init)"


def eval_set(run: RLRunConfig, tokenizer) -> tuple[list[dict], list[list[int]]] | None:
    p = run.prompts
    source = p.eval_source or (p.source if p.source.startswith(TASK_PREFIX) else "")
    if not source or not p.eval_size:
        return None
    records = Records(source, split="eval", size=p.eval_size, seed=p.seed)
    recs = [records[i] for i in range(len(records))]
    return recs, encode_all(recs, tokenizer, p.system)


# ----------------------------------------------------------------------------------- the loop
def fit_rl(run: RLRunConfig, workdir: str, *, resume: bool = False, init_from: str | None = None,
           progress: bool = True, mesh=None) -> RLSummary:
    """Runs ``run.train.steps`` RL steps (continuing from the newest checkpoint with ``resume``), holding the
    workdir's lock throughout."""
    with run_workdir(workdir, run.train, resume=resume, command="m1 rl") as (ckpt, latest):
        return _fit(run, workdir, ckpt, latest, init_from=init_from, progress=progress, mesh=mesh)


def _fit(run: RLRunConfig, workdir: str, ckpt: Checkpointer, latest: int | None, *, init_from: str | None,
         progress: bool, mesh) -> RLSummary:
    t, p = run.train, run.prompts
    objective_options = run.objective_options()  # errors in the config before any work
    # The data and the reward first: their errors come before any model is built.
    records = Records(p.source, split="train", seed=p.seed)
    get_reward(run.rollout.reward)
    mesh = sharding.as_mesh(mesh or t.mesh)
    sharding.check_batch(p.batch_size * run.rollout.group_size, mesh)
    summary = RLSummary()
    model, summary.init = initial_model(run, workdir, init_from, progress)
    tokenizer = get_tokenizer(p.tokenizer, model.cfg.vocab_size)
    scorer = Scorer(run, tokenizer, sharding.axis_size(mesh, sharding.BATCH_AXES))
    stream = PromptStream(records, tokenizer, shuffle=p.shuffle, seed=p.seed, system=p.system,
                          max_tokens=run.rollout.max_prompt_tokens)
    held_out = eval_set(run, tokenizer)
    kl = run.rl.kl_coef > 0
    opts = UpdateOptions(objective=run.rl.objective, objective_options=objective_options,
                         micro_batches=run.rl.micro_batches, remat=run.model.remat)
    ps = build_policy_state(model, mesh, opts, optimizer=run.optimizer, steps=t.steps * run.rl.update_rounds,
                            with_ref=kl, compiler_options=train.FAST_COMPILE if t.fast_compile else None)
    reference = build_policy_state(model, mesh, opts, steps=1) if kl else None
    del model
    meta = {"config": ps.model().cfg.to_dict(), "run": run.to_dict(), "init": summary.init}
    if latest is not None:
        check = functools.partial(check_resumable, config=meta["config"], run=run, what=init_from or summary.init,
                                  fixed=RL_RESUME_FIXED_FIELDS)
        got = ckpt.restore_newest(ps.abstract_state(), check_meta=check)
        ps.state = got.state
        stream.set_state(got.data.get("prompts", {}), where=f"{ckpt.directory}/{got.step}")
        summary.start_step, summary.damaged = got.step, got.damaged
        log.info("resumed from %s/%d", ckpt.directory, got.step)
    sampler = Sampler(run, stream, scorer)
    primary = jax.process_index() == 0
    metrics_f = metrics_file(workdir, summary.start_step) if primary else None

    def evaluate() -> float | None:
        if held_out is None:
            return None
        return scorer.pass_rate(ps.model(), held_out[0], held_out[1], run.rollout.max_new_tokens)

    t_start = time.perf_counter()
    if summary.start_step == 0:
        summary.eval_before = evaluate()
    bar = tqdm(total=t.steps, initial=summary.start_step, desc="rl", unit="step", disable=not (progress and primary))
    try:
        for step in range(summary.start_step, t.steps):
            t0 = time.perf_counter()
            batch, record = sampler.step(ps.model(), step)
            t1 = time.perf_counter()
            if kl:
                batch["ref_logprobs"] = _shifted(np.asarray(reference.logprobs(batch["tokens"])))
            trainable = int(batch["loss_mask"].sum())
            if trainable > 1 and (step == summary.start_step == 0
                                  or (t.consistency_every and (step + 1) % t.consistency_every == 0)):
                record["consistency"] = _consistency(ps, batch)
            t2 = time.perf_counter()
            if trainable:
                metrics = _update_rounds(ps, batch, run.rl.update_rounds, t.on_nan, step)
            else:  # no group with a signal (dynamic sampling found none): no optimizer step, momentum included
                metrics = {"skipped_rounds": run.rl.update_rounds}
            t3 = time.perf_counter()
            rows, length = batch["tokens"].shape
            record = {"step": step + 1, **record, **metrics, "rollout_s": t1 - t0, "update_s": t3 - t2,
                      "rollout_tokens_per_s": record["sampled_tokens"] / (t1 - t0)}
            if trainable:
                record["update_tokens_per_s"] = rows * length * run.rl.update_rounds / (t3 - t2)
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                record["eval_pass_rate"] = evaluate()
            if step + 1 == t.steps:
                summary.eval_after = record["eval_pass_rate"] = evaluate()
            summary.records.append(record)
            if primary:
                metrics_f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", pass_rate=f"{record['pass_rate']:.2f}",
                            refresh=False)
            if ckpt.save(step + 1, ps.state, {"prompts": stream.get_state()}, meta):
                summary.checkpoint_step = step + 1
            summary.steps = step + 1
        summary.checkpoint_step = save_last(ckpt, summary.steps, summary.checkpoint_step, ps.state,
                                            {"prompts": stream.get_state()}, meta)
    finally:
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
    summary.wall_s = time.perf_counter() - t_start
    summary.policy = ps
    return summary


def _consistency(ps, batch: dict) -> float | None:
    """The Pearson correlation of the behaviour log-probs and the update step's of the batch's response tokens
    (None when they do not vary: a correlation is undefined)."""
    try:
        return logprob_agreement(batch["old_logprobs"][:, 1:], np.asarray(ps.logprobs(batch["tokens"])),
                                 batch["loss_mask"][:, 1:])["correlation"]
    except ValueError:
        return None


def _shifted(logprobs: np.ndarray) -> np.ndarray:
    """[B, T - 1] log-probs of tokens 1.. -> [B, T] in the batch's layout (position 0 is never a response token)."""
    return np.pad(logprobs, ((0, 0), (1, 0)))


def _update_rounds(ps, batch: dict, rounds: int, on_nan: str, step: int) -> dict[str, float]:
    """``rounds`` optimizer steps on ``batch``; the metrics of the last (``entropy`` of the first: the
    behaviour policy's), with ``skipped`` rounds counted."""
    placed = ps.global_batch(batch)
    skipped, first, last = 0, None, None
    for k in range(rounds):
        m = jax.device_get(ps.update_placed(placed))
        if not m["ok"]:
            if on_nan == "stop":
                raise TrainingError(f"step {step + 1}, update round {k + 1}: non-finite loss ({float(m['loss'])}) or "
                                    f"gradient norm ({float(m['grad_norm'])}); the update was not applied. Resume "
                                    "from the last checkpoint with a lower optimizer.lr, or set train.on_nan=skip")
            skipped += 1
        first = m if first is None else first
        last = m
    out = {k: float(v) for k, v in last.items() if k not in ("ok", "tokens")}
    out["entropy"] = float(first["entropy"])
    out["skipped_rounds"] = skipped
    return out
