"""`prune`: a plan (from a file, from scores, or from rounds of collecting) → the rewritten checkpoint →
its model card → optionally the Hub.

`prune(model, out_dir, ...)` is the whole command; `prune_rounds` the `-d DATA [--rounds N]` part
(bench/rounds_quality.py calls it directly). Messages go through `echo(message, err=False)`, so the
CLI prints them with click and other callers with print. Imports no torch unless it collects, and with
--plan on a local folder neither numpy nor huggingface_hub (tests/test_cli_options.py checks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from surgery.collect.options import CollectOptions
from surgery.errors import UserError
from surgery.io import provenance
from surgery.pipeline.merge import MergeOptions, check_merge_request, write_merge_or_refit
from surgery.pipeline.score_options import GLOBAL_WARNING, ScoreOptions
from surgery.plan import Plan

Echo = Callable[..., None]
HEAL_STAGES = {"local": {"kd_steps": 0}, "kd": {"local_steps": 0}, "both": {}}  # --heal-between → heal() stages
HEAL_TOKENS = 65536  # --heal-tokens of the heal stages; lottery's is MC-Suite's 0.2M (surgery.refine.heal.lottery)


def _print(message: str, err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout)


@dataclass(frozen=True)
class RoundsOptions:
    """Collect here instead of reading --stats: `data` text, in `rounds` steps (None: one), `progressive`
    by layer blocks, healing between rounds (`heal_between`: local, kd, both or lottery). `heal_tokens`
    (round 1's), `heal_lr` and `heal_schedule` ("constant" or "doubling" tokens per round) default to the
    mode's: HEAL_TOKENS, heal's learning rates and constant for local/kd/both; MC-Suite's 0.2M, 1e-6 and
    doubling for lottery. `work_dir`: where the temporary checkpoints go (default: inside the output's
    temporary folder)."""

    data: tuple[str, ...] = ()
    rounds: int | None = None
    progressive: bool = False
    heal_between: str | None = None
    heal_tokens: int | None = None
    work_dir: Path | None = None
    heal_lr: float | None = None
    heal_schedule: str | None = None

    @property
    def collecting(self) -> bool:
        return bool(self.data or self.rounds or self.progressive)


@dataclass(frozen=True)
class WriteOptions:
    """How the checkpoint is written: replace OUT_DIR, allow per-layer counts, hash the source shards,
    keep removed experts as MoNE novices."""

    overwrite: bool = False
    allow_nonuniform: bool = False
    hash_shards: bool = False
    novices: bool = False


@dataclass(frozen=True)
class PushOptions:
    repo: str | None = None
    private: bool = False


def prune(model: str, out_dir: Path, *, scoring: ScoreOptions, plan_path: Path | None = None,
          stats_path: Path | None = None, rounds: RoundsOptions = RoundsOptions(),
          collect: CollectOptions = CollectOptions(), write: WriteOptions = WriteOptions(),
          push: PushOptions = PushOptions(), revision: str | None = None, command: str = "moe-surgery prune",
          eval_results: Path | None = None, echo: Echo = _print, merging: MergeOptions = MergeOptions()) -> dict:
    """Write OUT_DIR from MODEL (a folder or a Hub repo id) keeping the experts of a plan: `plan_path`, or
    scores of `scoring.criterion` (from `stats_path` or the weights), or rounds of collecting on
    `rounds.data`; `merging` merges the removed experts into the kept ones and/or refits (surgery.pipeline.merge).
    Writes the model card (`command` is recorded in it, and the `eval --json` file `eval_results` when given)
    and pushes when `push.repo`. Returns the content of the output's pruning.json."""
    from surgery.hub.client import check_can_push, push_folder, resolve_model
    from surgery.hub.model_card import keep_user_card, write_model_card

    if push.repo:
        check_can_push(push.repo)  # no token / offline: fail before the rewrite
    _check_request(scoring, plan_path)
    results = None
    if eval_results is not None:
        from surgery.hub.card_eval import read_eval_results

        results = read_eval_results(eval_results)  # a bad file fails before the rewrite
    model_dir = resolve_model(model, revision=revision, purpose="prune")
    _check_sources(scoring, plan_path, stats_path, rounds, write)
    check_merge_request(merging, stats_path, write.novices, rounds.collecting, scoring.criterion)
    calibration = None
    if not rounds.collecting:
        plan, merging = _plan(model_dir, plan_path, stats_path, scoring, echo, merging)
    with keep_user_card(out_dir, model_dir):
        if rounds.collecting:
            _, calibration = prune_rounds(model_dir, out_dir, scoring, rounds, collect, write, echo=echo)
        elif merging.active:
            write_merge_or_refit(model_dir, plan, out_dir, stats_path, merging, overwrite=write.overwrite,
                                 allow_nonuniform=write.allow_nonuniform, hash_shards=write.hash_shards,
                                 device=collect.device, seed=scoring.seed,
                                 novices=write.novices)
        else:
            _write(model_dir, plan, out_dir, stats_path, write, echo)
    record = provenance.read(out_dir)
    if stats_path is not None:
        from stats_formats import StatsFile

        calibration = StatsFile(stats_path).calibration
    if not write_model_card(out_dir, model, record, calibration=calibration, command=command, eval_result=results):
        echo(f"Kept the edited {out_dir / 'README.md'}; its numbers may describe an earlier prune.", err=True)
    echo(f"Wrote {out_dir}: {record['num_experts_before']} → {record['num_experts_after']} experts per MoE "
         f"layer ({record['model_type']}, {len(record['experts_per_layer'])} MoE layers).")
    if push.repo:
        echo(f"Pushed to {push.repo}: {push_folder(out_dir, push.repo, private=push.private)}")
    return record


def _check_request(scoring: ScoreOptions, plan_path: Path | None) -> None:
    """A plan or a criterion, and a --drop the criterion accepts (before anything is downloaded or collected)."""
    if (plan_path is None) == (scoring.criterion is None):
        raise UserError("give either --plan PLAN.json or --criterion NAME (with --stats and --ratio/--keep)")
    if scoring.drop is not None and scoring.criterion is not None:
        from surgery.criteria import get_criterion, is_criterion, oriented

        if is_criterion(scoring.criterion):
            oriented(get_criterion(scoring.criterion), scoring.drop)  # refuses recon and auto before any collecting


def _check_sources(scoring: ScoreOptions, plan_path: Path | None, stats_path: Path | None, rounds: RoundsOptions,
                   write: WriteOptions) -> None:
    if rounds.heal_between and not (rounds.data and rounds.rounds):
        raise UserError("--heal-between goes with -d DATA and --rounds N (it heals between rounds)")
    if rounds.collecting and (plan_path is not None or stats_path is not None or scoring.global_rank):
        raise UserError("-d/--rounds/--progressive collect their own statistics: drop --plan, --stats and --global")
    if write.novices and stats_path is None and not rounds.collecting:
        raise UserError("--novices needs --stats (or -d DATA): the novice vectors are the mean expert outputs it holds")


def _plan(model_dir: Path, plan_path: Path | None, stats_path: Path | None, scoring: ScoreOptions,
          echo: Echo, merging: MergeOptions) -> tuple[Plan, MergeOptions]:
    """The plan of --plan, or of the criterion's scores; `auto` with --calib-text also picks drop or a merge
    method (a --merge given keeps its method)."""
    if plan_path is not None:
        return Plan.read(plan_path), merging
    from surgery.pipeline.score import score_plan

    if scoring.global_rank:
        echo(GLOBAL_WARNING, err=True)
    if scoring.criterion == "auto" and merging.text and stats_path is not None:
        from surgery.pipeline.auto_loss import auto_by_loss

        methods = (merging.merge,) if merging.merge else ("drop", "lsq", "hc-smoe", "mc-smoe")
        plan, method = auto_by_loss(model_dir, stats_path, scoring, merging.text, methods)
        echo(f"auto (held-out loss): {plan.extra['auto']['winner']}", err=True)
        return plan, replace(merging, merge=method)
    return score_plan(model_dir, stats_path, scoring), merging


def _write(model_dir: Path, plan: Plan, out_dir: Path, stats_path: Path | None, write: WriteOptions,
           echo: Echo) -> None:
    """The rewrite, or with --novices the same plan with removed experts as mean-output constants."""
    if not write.novices:
        from surgery.rewrite.experts import rewrite_checkpoint

        rewrite_checkpoint(model_dir, plan, out_dir, allow_nonuniform=write.allow_nonuniform,
                           overwrite=write.overwrite, progress=True, hash_shards=write.hash_shards)
        return
    from stats_formats import StatsFile

    from surgery.io.identity import check_stats_match
    from surgery.rewrite.novices import write_novice_checkpoint

    stats = StatsFile(stats_path)
    check_stats_match(model_dir, stats)
    write_novice_checkpoint(model_dir, plan, stats, out_dir, progress=True, overwrite=write.overwrite,
                            hash_shards=write.hash_shards)
    memory = provenance.read(out_dir)["memory"]
    echo(f"Novices: {memory['novice_params']} values added; parameters {memory['params_before']} → "
         f"{memory['params_after']}, bytes {memory['bytes_before']} → {memory['bytes_after']}.")


def _round_score(model_dir: Path, stats: Path | None, keep: int, *, scoring: ScoreOptions) -> Plan:
    """One round's plan: the criterion's keep-lists for `keep` experts per layer."""
    from surgery.pipeline.score import score_plan

    return score_plan(model_dir, stats, replace(scoring, ratio=None, keep=keep, global_rank=False))


def between_rounds_healer(rounds: RoundsOptions, collect: CollectOptions, seed: int):
    """The `--heal-between MODE` callback of surgery.pipeline.rounds: heal(student, teacher, out, round index)
    → record, kept light for the heal stages (no teacher samples)."""
    lottery = rounds.heal_between == "lottery"
    schedule = rounds.heal_schedule or ("doubling" if lottery else "constant")
    if lottery:
        from surgery.refine.heal.lottery import ROUND1_TOKENS, LotteryOptions, lottery as run_lottery

        options = LotteryOptions(tokens=rounds.heal_tokens or ROUND1_TOKENS, seq_len=collect.seq_len,
                                 device=collect.device, seed=seed, progress=False,
                                 **({"lr": rounds.heal_lr} if rounds.heal_lr else {}))
        return partial(_lottery_round, run=run_lottery, data=list(rounds.data), options=options, schedule=schedule)
    from surgery.refine.heal.run import HealOptions, heal

    lrs = {"lr": rounds.heal_lr, "local_lr": rounds.heal_lr} if rounds.heal_lr else {}
    options = HealOptions(tokens=rounds.heal_tokens or HEAL_TOKENS, seq_len=collect.seq_len,
                          batch_size=collect.batch_size, device=collect.device, seed=seed, synthesize=False,
                          progress=False, **lrs, **HEAL_STAGES[rounds.heal_between])
    return partial(_heal_round, heal=heal, data=list(rounds.data), options=options, schedule=schedule)


def _heal_round(student: Path, teacher: Path, out: Path, index: int, *, heal, data: list[str], options,
                schedule: str) -> dict:
    from surgery.refine.heal.lottery import round_tokens

    tokens = round_tokens(options.tokens, index, schedule)
    return heal(student, teacher, data, out, replace(options, tokens=tokens, kd_tokens=tokens))


def _lottery_round(student: Path, teacher: Path, out: Path, index: int, *, run, data: list[str], options,
                   schedule: str) -> dict:
    from surgery.refine.heal.lottery import round_tokens

    return run(student, teacher, data, out, replace(options, tokens=round_tokens(options.tokens, index, schedule)))


def prune_rounds(model_dir: Path, out_dir: Path, scoring: ScoreOptions, rounds: RoundsOptions,
                 collect: CollectOptions, write: WriteOptions = WriteOptions(), echo: Echo = _print):
    """Collect, score and rewrite in rounds (surgery.pipeline.rounds); returns (RoundsResult, the first
    round's calibration record or None)."""
    from surgery.pipeline.rounds import prune_in_rounds

    heal = None
    if rounds.heal_between is not None:
        if not rounds.rounds:
            raise UserError("--heal-between goes with --rounds N (it heals between rounds)")
        heal = between_rounds_healer(rounds, collect, scoring.seed)
    rewrite_kw = {"overwrite": write.overwrite, "hash_shards": write.hash_shards}
    if rounds.work_dir is not None:
        rewrite_kw["work_dir"] = rounds.work_dir
    result, calibration = prune_in_rounds(
        model_dir, out_dir, data=list(rounds.data), rounds=rounds.rounds, progressive_mode=rounds.progressive,
        criterion=scoring.criterion, ratio=scoring.ratio, keep=scoring.keep, score=partial(_round_score, scoring=scoring),
        collect_options=replace(collect, progress=True), seed=scoring.seed, novices=write.novices, heal=heal,
        **rewrite_kw)
    for line in result.lines():
        echo(line, err=True)
    return result, calibration
