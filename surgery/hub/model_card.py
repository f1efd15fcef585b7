"""The model card (README.md) of a pruned checkpoint: Hub metadata, what was removed, how to redo it.

Cards we write carry a stamp (surgery.hub.card_file): a README whose stamp still matches is ours and may be
regenerated; any other README, except a byte-for-byte copy of the source model's card, was written or edited
by a person and is kept.

The metadata sets `base_model` but no `base_model_relation`: the Hub defines only "adapter",
"merge", "quantized" and "finetune", and removing experts without retraining is none of them.
"""

from __future__ import annotations

import copy
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from surgery.architectures import resolve
from surgery.hub.card_file import replace_card, save_card, stamp, unstamp
from surgery.hub.card_eval import EVAL_BEGIN, EVAL_END, eval_block, model_index, with_earlier
from surgery.hub.client import is_repo_id, parse_repo_id
from surgery.io import Checkpoint
from surgery.io.provenance import PRUNING_JSON
from surgery.plan import Plan

README = "README.md"
TAGS = ["moe", "expert-pruning", "moe-surgery"]
# Carried from the source card: the pruned weights are a derivative under the same terms.
INHERITED_KEYS = ("license", "license_name", "license_link", "language")
_EVAL_RE = re.compile(re.escape(EVAL_BEGIN) + r".*?" + re.escape(EVAL_END), re.S)
WHAT_BEGIN, WHAT_END = "<!-- moe-surgery:weights -->", "<!-- /moe-surgery:weights -->"
_WHAT_RE = re.compile(re.escape(WHAT_BEGIN) + r".*?" + re.escape(WHAT_END), re.S)
# huggingface_hub.repocard's REGEX_YAML_BLOCK: the metadata block at the top of a card.
_YAML_BLOCK_RE = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


@dataclass(frozen=True)
class CheckpointNumbers:
    """Sizes of one checkpoint, read from its config and safetensors headers only."""

    experts: dict[int, int]  # MoE layer -> routed experts stored
    top_k: int
    total_params: int  # stored tensor elements (packed dtypes such as MXFP4 count storage elements)
    active_params: int  # non-expert elements + top_k experts' elements in every MoE layer
    disk_bytes: int  # sum of the shard sizes


def checkpoint_numbers(path: str | Path) -> CheckpointNumbers:
    """Count parameters per role; expert counts come from the tensors, so non-uniform checkpoints work."""
    with Checkpoint(path) as ckpt:
        layout = resolve(ckpt.config, ckpt.names())
        numel = {name: math.prod(ckpt.info(name).shape) for name in ckpt.names()}
        total = sum(numel.values())
        active = total
        experts: dict[int, int] = {}
        for layer, entry in layout.layers.items():
            # MoNE novices keep only an `approx_value` vector: they are not stored experts.
            real = {e: [n for n in ns if not n.endswith(".approx_value")] for e, ns in entry.per_expert.items()}
            real = {e: ns for e, ns in real.items() if ns}
            names = [n for ns in real.values() for n in ns] + entry.fused
            count = len(real) or ckpt.info(entry.fused[0]).shape[0]
            expert_params = sum(numel[n] for n in names)
            active -= expert_params - min(layout.top_k, count) * (expert_params // count)
            experts[layer] = count
        return CheckpointNumbers(experts, layout.top_k, total, active, ckpt.total_bytes)


def write_model_card(
    out_dir: str | Path,
    source: str,
    provenance: dict,
    *,
    command: str,
    eval_result: dict | None = None,
    calibration: dict | None = None,
) -> bool:
    """Write OUT_DIR/README.md for a checkpoint `rewrite_checkpoint` produced; returns False (and
    writes nothing) when the README there was written or edited by a person.

    `source` is MODEL as the user gave it, `provenance` the content of pruning.json (`surgery.io.provenance.read`),
    `command` the prune command line, `calibration` the statistics file's calibration record, `eval_result`
    what `moe-surgery eval --json` gives (perplexity and/or task scores; see surgery.hub.card_eval).
    """
    out_dir = Path(out_dir)
    raw_plan = provenance.get("plan")
    plan = Plan.from_json(raw_plan, f"{out_dir / PRUNING_JSON}: plan") if raw_plan else Plan({})
    source_dir = Path(provenance["source"]["path"])
    readme = out_dir / README
    if readme.is_file() and _is_user_card(readme, source_dir):
        return False
    before, after = checkpoint_numbers(source_dir), checkpoint_numbers(out_dir)
    repo_id, commit = hub_origin(source, source_dir)
    index = model_index(out_dir.name, eval_result["tasks"]) if eval_result and "tasks" in eval_result else []
    meta = _metadata_yaml(repo_id, _source_metadata(source_dir / README), provenance["model_type"], index)
    body = "\n".join([
        _intro(out_dir.name, source, repo_id, commit, provenance, after),
        _pruning_section(plan, before, after),
        _calibration_section(calibration, plan),
        eval_block(eval_result) + "\n",
        _reproduce_section(command, provenance),
    ])
    save_card(readme, f"---\n{meta}\n---\n\n{body}")
    return True


def update_card_eval(out_dir: str | Path, eval_result: dict) -> bool:
    """Put `moe-surgery eval` results into a card we wrote and nobody edited; False if there is none."""
    readme = Path(out_dir) / README
    content = card_with_eval(readme.read_text(encoding="utf-8"), eval_result, Path(out_dir).name) \
        if readme.is_file() else None
    if content is None:
        return False
    replace_card(readme, content)
    return True


def card_with_eval(card: str, eval_result: dict, model_name: str) -> str | None:
    """`card` (a README we wrote, unedited) with its evaluation section and `model-index` metadata replaced
    by `eval_result`'s; None for any other text (a card a person wrote or edited is not rewritten)."""
    content = unstamp(card)
    match = _YAML_BLOCK_RE.search(content) if content is not None else None
    if match is None:
        return None
    meta = yaml.safe_load(match.group(2)) or {}
    meta.pop("model-index", None)
    eval_result = with_earlier(eval_result, content)
    if "tasks" in eval_result:
        meta["model-index"] = model_index(model_name, eval_result["tasks"]) or None
    meta = {k: v for k, v in meta.items() if v is not None}
    head = f"---\n{yaml.dump(meta, stream=None, allow_unicode=True, sort_keys=False).strip()}\n---\n"
    block = eval_block(eval_result)
    return stamp(_EVAL_RE.sub(lambda _: block, head + content[match.end():], count=1))


def card_for_push(folder: str | Path, eval_result: dict) -> str:
    """The README.md to upload: the folder's card with `eval_result` in it. Refused for a card moe-surgery did not
    write or that was edited since (a person's text is never rewritten)."""
    from surgery.hub.client import HubError

    readme = Path(folder) / README
    card = card_with_eval(readme.read_text(encoding="utf-8"), eval_result, Path(folder).name) \
        if readme.is_file() else None
    if card is None:
        raise HubError(f"{readme}: not a model card moe-surgery wrote (or edited since): --eval-results cannot add "
                       "the scores; add them to the card by hand, or push without --eval-results")
    return card


@contextmanager
def keep_user_card(out_dir: str | Path, source_dir: str | Path) -> Iterator[None]:
    """Around a rewrite with --overwrite: a README.md the user edited in the old OUT_DIR survives it."""
    readme = Path(out_dir) / README
    saved = readme.read_bytes() if readme.is_file() and _is_user_card(readme, Path(source_dir)) else None
    yield
    if saved is not None:
        readme.write_bytes(saved)


def hub_origin(source: str, source_dir: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) of the source: from the HF cache layout `models--org--name/snapshots/<commit>`,
    else from a repo id given as MODEL; (None, None) for a plain local folder."""
    parts = source_dir.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/"), parts[-1]
    if is_repo_id(source):
        return parse_repo_id(source)[0], None
    return None, None


def _is_user_card(readme: Path, source_dir: Path) -> bool:
    """Neither a pristine card of ours nor the source model's card copied by the rewriter."""
    text = readme.read_bytes()
    source_card = source_dir / README
    if source_card.is_file() and source_card.read_bytes() == text:
        return False
    return unstamp(text.decode("utf-8", errors="replace")) is None


def _source_metadata(readme: Path) -> dict:
    """The source card's YAML metadata; a missing or malformed card gives nothing to inherit.
    Read as huggingface_hub's `metadata_load` does (without importing the Hub client)."""
    if not readme.is_file():
        return {}
    try:
        match = _YAML_BLOCK_RE.search(readme.read_text(encoding="utf-8-sig"))
        data = yaml.safe_load(match.group(2)) if match else None
    except (yaml.YAMLError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _metadata_yaml(repo_id: str | None, source_meta: dict, model_type: str, index: list[dict]) -> str:
    """The card's YAML block, byte for byte what huggingface_hub's `ModelCardData(...).to_yaml()` gives
    (keys in its field order, None values left out, tags deduplicated, `model-index` from eval results last,
    `yaml.dump` with allow_unicode), without importing huggingface_hub (0.2 s of a small prune)."""
    inherited = {k: source_meta[k] for k in INHERITED_KEYS if source_meta.get(k) is not None}
    fields = {
        "base_model": repo_id,
        "language": inherited.get("language"),
        "library_name": "transformers",
        "license": inherited.get("license"),
        "license_name": inherited.get("license_name"),
        "license_link": inherited.get("license_link"),
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys([*TAGS, model_type])),
        "model-index": index or None,
    }
    data = copy.deepcopy({k: v for k, v in fields.items() if v is not None})
    return yaml.dump(data, stream=None, allow_unicode=True, sort_keys=False).strip()


def _intro(title: str, source: str, repo_id: str | None, commit: str | None, provenance: dict,
           after: CheckpointNumbers) -> str:
    before_count, after_count = provenance["num_experts_before"], provenance["num_experts_after"]
    if repo_id:
        origin = f"[{repo_id}](https://huggingface.co/{repo_id})" + (f" (commit `{commit[:12]}`)" if commit else "")
    else:
        origin = f"the local checkpoint `{source}` (not a Hub repository, so `base_model` is not set)"
    if provenance.get("novices"):
        first = (f"{origin} with routed experts replaced by moe-surgery: {before_count} → {after_count} full experts "
                 "per MoE layer, the others replaced by constant MoNE \"novices\".")
    else:
        first = (f"{origin} with routed experts removed by moe-surgery: {before_count} → {after_count} experts per "
                 "MoE layer.")
    what = [first, f"{WHAT_BEGIN}\n{what_was_done(provenance)}\n{WHAT_END}"]
    lines = [f"# {title}", "", *what]
    if len(set(after.experts.values())) > 1:
        lines += ["", "**Non-uniform:** MoE layers keep different numbers of experts (config key "
                  "`moe_surgery_experts_per_layer`); vanilla transformers cannot load this checkpoint."]
    return "\n".join(lines) + "\n"


def what_was_done(provenance: dict) -> str:
    """How the kept experts' weights came to be, from pruning.json: copied, merged, refitted, healed."""
    lines = []
    if provenance.get("novices"):
        lines.append("A novice keeps its router row and expert id and returns its mean calibration output times its "
                     "gate (config key `approximate_experts`, the layout vLLM serves); in transformers load it with "
                     "`surgery.model.load_model`.")
    merge = provenance.get("merge")
    if merge:
        lines.append(f"Each kept expert is the `{merge.get('method')}` merge of a group of original experts (`merge` "
                     "in `pruning.json` lists the groups), in the place and with the router row of the group's "
                     "representative.")
    else:
        lines.append("The kept experts started as byte-for-byte copies of the original ones"
                     + ("" if provenance.get("novices") else ", renumbered 0..k-1, with the router rows sliced to match")
                     + ".")
    refit, heal = provenance.get("refit"), provenance.get("heal") or {}
    records = heal if isinstance(heal, list) else [heal]  # `--rounds --heal-between`: one record per round
    healed = bool(heal) and not (isinstance(heal, dict) and heal.get("by") == "prune --refit")
    stages = list(dict.fromkeys(x.get("stage") for r in records if isinstance(r, dict) for x in r.get("stages", [])
                                if isinstance(x, dict)))
    if refit:
        lines.append(f"Then `prune`'s refit fitted the kept experts and the router rows of each MoE layer to the "
                     f"original layer's output on {refit.get('tokens') or 0:,} calibration tokens, one layer at a time "
                     "(no end-to-end training).")
    if healed:
        done = " and ".join({"local": "a layer-local fit", "distill": "logits distillation"}.get(x, str(x))
                            for x in stages) or "training"
        lines.append(f"{'Then' if not refit else 'After that,'} `moe-surgery heal` trained them against the original "
                     f"model: {done} (`heal` in `pruning.json`).")
    if not (refit or healed):
        lines.append("Nothing was retrained.")
    return " ".join(lines)


def refresh_what(folder: str | Path) -> bool:
    """Re-describe how the weights came to be in `folder`'s card from its pruning.json (after `heal`, whose output
    keeps the student's card); False when the README is not an unedited card of ours."""
    readme = Path(folder) / README
    content = unstamp(readme.read_bytes().decode("utf-8", errors="replace")) if readme.is_file() else None
    if content is None or not _WHAT_RE.search(content):
        return False
    record = json.loads((Path(folder) / PRUNING_JSON).read_text())
    block = f"{WHAT_BEGIN}\n{what_was_done(record)}\n{WHAT_END}"
    save_card(readme, _WHAT_RE.sub(lambda _: block, content, count=1))
    return True


def _pruning_section(plan: Plan, before: CheckpointNumbers, after: CheckpointNumbers) -> str:
    removed = 1 - sum(after.experts.values()) / sum(before.experts.values())
    ratio = removed if plan.ratio is None else plan.ratio
    rows = [
        ("Routed experts per MoE layer", _experts(before), _experts(after)),
        ("Experts per token (top-k)", str(before.top_k), str(after.top_k)),
        ("Parameters, total", _params(before.total_params), _params(after.total_params)),
        ("Parameters, active per token", _params(before.active_params), _params(after.active_params)),
        ("Disk size (safetensors shards)", _size(before.disk_bytes), _size(after.disk_bytes)),
    ]
    table = ["| | Original | Pruned |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join([
        "## Pruning",
        "",
        f"- Criterion: {_criterion(plan)}",
        f"- Ratio: {ratio:g} ({ratio * 100:.4g}% of the routed experts removed, {len(after.experts)} MoE layers)",
        "- Kept expert ids per layer, the plan and its scores: `pruning.json`",
        "",
        *table,
        "",
        "Parameters are stored tensor elements; active = everything outside the routed experts plus "
        "top-k experts per MoE layer.",
        "",
    ])


def _criterion(plan: Plan) -> str:
    name = plan.criterion
    if name is None:
        return "hand-made plan (`--plan`)"
    winner = (plan.extra.get("auto") or {}).get("winner")
    return f"`{name}` (selected `{winner}` on held-out data)" if winner else f"`{name}`"


def _calibration_section(calibration: dict | None, plan: Plan) -> str:
    stats_sha = plan.stats_sha256
    if calibration:
        lines = [
            f"- Data: {', '.join(f'`{s}`' for s in calibration['sources'])}",
            f"- {calibration['num_sequences']} sequences of up to {calibration['seq_len']} tokens, "
            f"{calibration['num_tokens']:,} tokens in all (shuffle seed {calibration['seed']})",
        ]
        if calibration.get("holdout_sequences"):
            lines.append(f"- {calibration['holdout_sequences']} more sequences held out to choose the criterion")
    elif stats_sha:
        lines = ["- Statistics were collected with `moe-surgery collect`; the data was not recorded here."]
    else:
        lines = ["- None: the plan did not use activation statistics."]
    if stats_sha:
        lines.append(f"- Statistics file sha256: `{stats_sha}`")
    return "\n".join(["## Calibration data", "", *lines, ""])


def _reproduce_section(command: str, provenance: dict) -> str:
    return "\n".join([
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Written by moe-surgery {provenance['tool_version']} on {provenance['created']}; `pruning.json` holds "
        "the full plan" + (" and the sha256 of every source shard." if provenance["source"]["shards_sha256"] else "."),
    ])


def _experts(numbers: CheckpointNumbers) -> str:
    counts = set(numbers.experts.values())
    return str(counts.pop()) if len(counts) == 1 else f"{min(counts)}–{max(counts)} (varies by layer)"


def _params(n: int) -> str:
    return f"{n:,} ({_human(n, 1000, ('', 'K', 'M', 'B', 'T'))})"


def _size(n: int) -> str:
    return _human(n, 1000, (" B", " kB", " MB", " GB", " TB"))


def _human(n: float, base: int, units: tuple[str, ...]) -> str:
    """Three significant digits and a unit: 30.5B, 61.1 GB."""
    i = 0
    while n >= base and i < len(units) - 1:
        n /= base
        i += 1
    return f"{n:.3g}{units[i]}"
