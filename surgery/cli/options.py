"""Every command-line option, defined once and shared by every command that takes it.

One name means one thing, with one help text, one type and (nearly always) one default;
tests/test_cli_options.py walks the commands and checks it. Values are validated here, as they
are parsed (a device, a ratio in [0, 1), a registered criterion). Three options take their
default from the command, through a factory whose only parameter is that default
(`seq_len_option`, `batch_size_option`, `ratio_option`; each docstring says why); a few options
are required by one command and optional in another (`required` is then the factory's parameter).

Option groups (`collect_options`, `score_options`, ...) turn several options into one typed
object passed to the command, which hands it to `surgery.pipeline` unchanged.

This module imports nothing heavy: `prune` and `verify` never import torch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from surgery.collect.options import CollectOptions

# --- types: one instance each, shared by every option that uses it --------------------------------


class DeviceType(click.ParamType):
    """auto, cpu, cuda, cuda:N or mps; the string is passed on unchanged (torch is not imported to parse)."""

    name = "device"
    _pattern = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, str) and self._pattern.fullmatch(value):
            return value
        self.fail(f"{value!r}: use auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps", param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[auto|cpu|cuda|cuda:N|mps]"


class CriterionType(click.ParamType):
    """A name from the criteria registry (surgery.criteria.CRITERIA) or `family:M,A,B`, read when a value is parsed."""

    name = "criterion"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from surgery.criteria import CRITERIA, is_criterion
        from surgery.criteria.family import FAMILY_PREFIX, FAMILY_SYNTAX

        if is_criterion(value):
            return value
        if value.startswith(FAMILY_PREFIX):  # say what is wrong with the member, not that it is unknown
            self.fail(f"criterion {value!r} is not {FAMILY_SYNTAX}", param, ctx)
        self.fail(f"unknown criterion {value!r}; choose from {', '.join(CRITERIA)}, or family:M,A,B", param, ctx)


DEVICE = DeviceType()
CRITERION = CriterionType()
RATIO = click.FloatRange(0, 1, max_open=True)
DTYPE = click.Choice(["auto", "float32", "bfloat16", "float16"])
PATH = click.Path(path_type=Path)
FILE = click.Path(dir_okay=False, path_type=Path)
TEXT = click.Path()
COUNT = click.IntRange(min=1)
SEQ_LEN = click.IntRange(min=2)

# The criteria that read expert weights rather than statistics (tests check this list against the registry).
WEIGHT_CRITERIA = ("weight_norm", "aimer", "mcs-ewn", "mcs-wsr", "mcs-ews", "mcs-rwn")

# --- inputs and outputs -------------------------------------------------------------------------------


def output_option(required: bool = True) -> Callable:
    """-o/--output; `stats export` alone may leave it out (it then prints)."""
    return click.option(
        "-o", "--output", "output", type=PATH, required=required,
        help="Where to write: the new checkpoint folder (prune, sparsify, heal), the statistics file (collect, "
             "stats merge), the plan JSON (score) or the exported file (stats export; default: stdout).")


def data_option(required: bool = True) -> Callable:
    """-d/--data; `prune` reads text only when it collects (-d instead of --stats)."""
    return click.option(
        "-d", "--data", "data", multiple=True, required=required, type=TEXT,
        help="Text: .jsonl (a `text` field per line), .txt (blank-line-separated documents) or a folder of them "
             "(for eval each file is one domain); repeatable.")


stats_option = click.option(
    "--stats", "stats_path", type=FILE,
    help="Statistics file from `collect`: what --criterion scores (prune, sparsify), and for sparsify the "
         "router-weighted input norms of moe-pruner and wanda.")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace the output (OUTPUT, or demo's --workdir) if it exists.")
revision_option = click.option(
    "--revision",
    help="Hub branch, tag or commit: the one MODEL (heal: --teacher) is read from, or for push the branch "
         "committed to (created from main if missing). MODEL may also be written org/name@REV.")
private_option = click.option(
    "--private", is_flag=True,
    help="Create the Hub repository as private (prune: with --push-to-hub); an existing one keeps its visibility.")

# --- scoring ---------------------------------------------------------------------------------------------


def criterion_option(required: bool = False) -> Callable:
    """--criterion; `score` needs one, `prune` may take --plan instead, `sparsify` only with --ratio."""
    return click.option(
        "--criterion", type=CRITERION, required=required,
        help="Expert-scoring criterion (`moe-surgery criteria` lists them with their formulas); the weight "
             f"criteria ({', '.join(WEIGHT_CRITERIA)}) and random read no statistics file.")


def ratio_option(default: float | None = None) -> Callable:
    """--ratio. Only `demo` has a default (0.5): it has no other way to be told how much to prune, while
    prune, score and sparsify take --keep or nothing instead."""
    return click.option(
        "--ratio", type=RATIO, default=default, show_default=default is not None,
        help="Fraction of the experts removed from every MoE layer, in [0, 1) (0.25 removes 25%).")


keep_option = click.option("--keep", type=int, help="Experts kept per MoE layer (instead of --ratio).")
global_option = click.option(
    "--global", "global_rank", is_flag=True,
    help="Rank experts across layers (scores divided by their layer's sum of |scores|) for the same total; gives "
         "a NON-UNIFORM plan that vanilla transformers cannot load (prune needs --allow-nonuniform).")
seed_option = click.option(
    "--seed", type=int, default=0, show_default=True,
    help="Shuffles the text before packing (collect, prune -d, heal: also its minibatches) and seeds the `random` "
         "criterion (layer l uses seed + l).")
holdout_stats_option = click.option(
    "--holdout-stats", type=FILE,
    help="For auto: statistics from other data whose main fields serve as the held-out slice.")
drop_option = click.option(
    "--drop", type=click.Choice(["low", "high"]),
    help="Drop the experts with the lowest or highest signal (default: the criterion's own, listed by "
         "`moe-surgery criteria`; the similarity signals mcs-ews, mcs-eas, mcs-ets and mcs-egs drop high). "
         "Not for recon or auto.")

# --- running a model -------------------------------------------------------------------------------------


def seq_len_option(default: int) -> Callable:
    """--seq-len: one meaning (tokens per sequence), three defaults kept from before the options were shared:
    2048 for calibration (collect, prune -d; statistics are sums, long sequences cover long-range routing),
    1024 for heal (each sequence is back-propagated: activation memory), 512 for eval (perplexity windows,
    comparable with the figures in bench/RESULTS.md)."""
    return click.option(
        "--seq-len", type=SEQ_LEN, default=default, show_default=True,
        help="Tokens per sequence (eval: per window), capped at the model's max_position_embeddings.")


def batch_size_option(default: int) -> Callable:
    """--batch-size: sequences per forward pass (or training step); 4 when collecting, whose float64 sums
    and per-expert buffers grow with the batch, 8 for eval and heal."""
    return click.option("--batch-size", type=COUNT, default=default, show_default=True,
                        help="Sequences per forward pass (eval --tasks: lm-eval requests; heal: per optimizer step).")


device_option = click.option("--device", type=DEVICE, default="auto", show_default=True,
                             help="auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps.")
dtype_option = click.option(
    "--dtype", type=DTYPE, default="auto", show_default=True,
    help="Dtype the model runs in: auto = bfloat16 on GPU, float32 on CPU (eval: auto keeps the checkpoint's); "
         "statistics are summed in float64, heal keeps trained weights in float32.")
output_dtype_option = click.option(
    "--output-dtype", type=click.Choice(["bf16"]), default=None,
    help="Quantized students (FP8, NVFP4, MXFP4): write the trained weights unquantized in this dtype, their scales "
         "dropped and the modules listed as unquantized in config.json's quantization_config. Default: re-encode "
         "them in the student's own scheme with fresh scales (the error is recorded in pruning.json).")
samples_option = click.option("--samples", type=int, default=256, show_default=True, help="Calibration sequences.")
holdout_option = click.option(
    "--holdout", type=click.IntRange(min=0), default=None,
    help="Extra calibration sequences kept aside for held-out error (used by the `auto` criterion); 0 disables. "
         "Default: one per 8 --samples, at least 1 and at most 32 (min(32, max(1, samples // 8))).")
stream_layers_option = click.option(
    "--stream-layers/--no-stream-layers", default=None,
    help="Materialise one decoder layer at a time from the shards (the next layer is read while one computes), "
         "or load the whole model. Default: auto, i.e. stream only when the weights do not fit in the device's "
         "free memory (GPU memory, or available RAM on the CPU).")

stride_option = click.option(
    "--stride", type=COUNT, default=None,
    help="eval: start a perplexity window every N tokens (default: --seq-len, non-overlapping windows); with "
         "N < --seq-len windows overlap and each token is scored once, with more context.")

# --- downstream tasks (lm-evaluation-harness) -------------------------------------------------------------

tasks_option = click.option(
    "--tasks", multiple=True, metavar="TASKS",
    help="lm-evaluation-harness tasks, comma-separated or repeated: task names (arc_easy, hellaswag, ...; their "
         "data come from the Hub) or local task files in lm-eval's YAML format (a .yaml file or a folder of them; "
         "relative data_files are read from the file's folder). Needs `pip install 'moe-surgery[eval]'`.")
num_fewshot_option = click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
                                  help="Few-shot examples per task prompt (default: each task's own, usually 0).")
limit_option = click.option("--limit", type=COUNT, default=None,
                            help="Evaluate at most N documents per task (default: all).")
eval_results_option = click.option(
    "--eval-results", type=FILE,
    help="JSON written by `moe-surgery eval --json` for this checkpoint: its perplexity and task scores go into the "
         "model card (a results table, and `model-index` metadata for task scores).")
sampling_option = click.option(
    "--sampling", type=click.Choice(["packed", "documents"]), default="packed", show_default=True,
    help="How calibration text becomes sequences: packed = documents joined (EOS between) and cut into "
         "consecutive windows; documents = one window per document of at least --seq-len tokens, at a seeded "
         "random offset, no packing (the SparseGPT/Wanda sampler the papers use). Recorded in the statistics file.")
gradients_option = click.option(
    "--gradients", type=click.Choice(["per-sequence", "accumulated"]), is_flag=False, flag_value="per-sequence",
    default=None,
    help="Also back-propagate the calibration sequences' next-token loss and store per-expert gradient statistics "
         "(mcs-egs/ege/ego/egn; prune: used by those criteria only): per-sequence (the value when the option is "
         "given alone) sums each sequence's statistics and merges across files; accumulated takes them of the "
         "gradient summed over all sequences (the paper's form; such files cannot be merged). One extra forward "
         "and backward pass, one sequence at a time (with --stream-layers: one layer at a time).")

# --- groups: several options in, one typed object out ------------------------------------------------------


def option_group(target: str, build: Callable[..., Any], *options: Callable) -> Callable:
    """A decorator adding `options` to a command and passing their values as ONE argument, `target` =
    build(**values) (the options' parameter names are build's keyword arguments)."""

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return f(*args, **{target: build(**values)}, **kwargs)

        command.__click_params__ = list(getattr(f, "__click_params__", []))  # type: ignore[attr-defined]
        before = len(command.__click_params__)
        for option in reversed(options):
            option(command)
        names = [p.name for p in command.__click_params__[before:]]
        return command

    return decorate


# samples, seq_len, holdout, batch_size, device, dtype, stream_layers, sampling, gradients → CollectOptions
# (collect, prune -d)
collect_options = option_group(
    "collecting", CollectOptions, samples_option, seq_len_option(2048), holdout_option, batch_size_option(4), device_option,
    dtype_option, stream_layers_option, sampling_option, gradients_option)
# the calibration pass of `sparsify -d` (one layer at a time, no statistics file): the text-and-device subset
calibration_options = option_group(
    "collecting", CollectOptions, samples_option, seq_len_option(2048), batch_size_option(4), device_option,
    dtype_option, sampling_option)


def score_options(required: bool = False) -> Callable:
    """criterion, ratio, keep, global, seed, drop, holdout-stats → ScoreOptions (score, prune)."""
    from surgery.pipeline.score_options import ScoreOptions

    return option_group("scoring", ScoreOptions, criterion_option(required), ratio_option(), keep_option,
                        global_option, seed_option, drop_option, holdout_stats_option)


class RenamedOptions(click.Command):
    """A command that still accepts the earlier spelling of a renamed option (`renamed`: old → new).

    The old name is not an option of its own (one definition per option), and --help shows the new one.
    """

    def __init__(self, *args: Any, renamed: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renamed = renamed

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out, rest = [], list(args)
        while rest and rest[0] != "--":  # after "--" every word is an argument
            name, eq, value = rest.pop(0).partition("=")
            out.append(self.renamed.get(name, name) + eq + value)
        return super().parse_args(ctx, out + rest)
