"""Output hashes of every rewriting CLI command, to prove a refactor changes no behaviour.

    python bench/behaviour_check.py run --tree PATH --out MANIFEST.json
    python bench/behaviour_check.py compare A.json B.json

`run` builds a tiny seeded Qwen3-MoE (plain transformers, never the project) and a calibration
file in WORK (/tmp/behaviour-work, wiped first), then runs each command with
`PYTHONPATH=PATH python -m surgery.cli ...` and cwd WORK, so paths recorded in outputs are the
same for any tree. Every output file is hashed after normalisation (see NORMALISED):

- .safetensors with metadata beyond {"format"} (statistics files): sha256 of each tensor's bytes,
  plus the tensor dtypes/shapes and the metadata JSON with VOLATILE_KEYS dropped;
- .json files: sha256 of the JSON with VOLATILE_KEYS dropped (any depth), re-serialised (key order kept);
- .json, README.md and .txt text first gets the TEXT_SUBS substitutions;
- anything else (model shards, csv, tokenizer files): sha256 of the raw bytes.

`compare` prints every file whose hash differs (or exists in only one manifest), exit 1 if any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORK = Path("/tmp/behaviour-work")
SEED = 0

# Normalisation, found by diffing two runs of the SAME code (everything else was byte-identical):
# - `created` (statistics metadata, pruning.json, its `sparsity` block): wall-clock time of writing;
# - `tool_version`: the package version string, which a refactor may bump without changing behaviour;
# - `timing` (statistics metadata, eval/heal records, since issue 20): load and compute seconds of the run;
#   other `version` keys (statistics schema, tokenizer.json) are content and are kept;
# - the statistics file's own whole-file sha256, quoted by plans, pruning.json, model cards,
#   `stats show` and `stats export`: it covers `created`, so it differs on every run. Its tensors and
#   scrubbed metadata are compared directly instead, so the placeholder hides nothing;
# - in text: ISO timestamps, "moe-surgery X.Y.Z" and the model card's self-hash (of text holding the time).
VOLATILE_KEYS = {"created", "tool_version", "timing"}
TEXT_SUBS = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"moe-surgery \d+\.\d+\S*"), "moe-surgery <version>"),
    (re.compile(r"moe-surgery:card sha256=[0-9a-f]{64}"), "moe-surgery:card sha256=<card>"),
]
NORMALISED = {"json_keys": sorted(VOLATILE_KEYS), "text": [[p.pattern, r] for p, r in TEXT_SUBS],
              "stats_sha256": "<stats-sha256>"}

STATS = "stats.safetensors"
COMMANDS: list[tuple[str, list[str]]] = [
    ("collect", ["collect", "model", "-d", "calib.jsonl", "-o", STATS, "--samples", "8", "--seq-len", "32",
                 "--holdout", "4", "--batch-size", "4", "--device", "cpu", "--dtype", "float32"]),
    ("stats-show", ["stats", "show", STATS]),
    ("stats-export-csv", ["stats", "export", STATS, "--format", "csv", "-o", "out/stats.csv"]),
    ("stats-export-json", ["stats", "export", STATS, "--format", "json", "-o", "out/stats.json"]),
    ("score-reap", ["score", STATS, "--criterion", "reap", "--ratio", "0.25", "-o", "out/plan-reap.json"]),
    ("score-frequency", ["score", STATS, "--criterion", "frequency", "--keep", "5", "-o", "out/plan-frequency.json"]),
    ("score-recon", ["score", STATS, "--criterion", "recon", "--ratio", "0.5", "-o", "out/plan-recon.json"]),
    ("score-aimer", ["score", "--criterion", "aimer", "--model", "model", "--ratio", "0.25",
                     "-o", "out/plan-aimer.json"]),
    ("prune-plan", ["prune", "model", "--plan", "out/plan-recon.json", "-o", "out/prune-plan", "--hash-shards"]),
    ("prune-reap", ["prune", "model", "--stats", STATS, "--criterion", "reap", "--ratio", "0.25",
                    "-o", "out/prune-reap"]),
    ("prune-aimer", ["prune", "model", "--stats", STATS, "--criterion", "aimer", "--ratio", "0.25",
                     "-o", "out/prune-aimer"]),
    ("prune-novices", ["prune", "model", "--stats", STATS, "--criterion", "reap", "--ratio", "0.25", "--novices",
                       "-o", "out/prune-novices"]),
    ("sparsify-moe-pruner", ["sparsify", "model", "--stats", STATS, "--sparsity", "0.5",
                             "-o", "out/sparsify-moe-pruner"]),
    ("sparsify-wanda-2of4", ["sparsify", "model", "--stats", STATS, "--method", "wanda", "--sparsity", "0.5",
                             "--pattern", "2:4", "-o", "out/sparsify-wanda-2of4"]),
    ("sparsify-remove", ["sparsify", "model", "--stats", STATS, "--remove-ratio", "0.25", "--criterion", "reap",
                         "--sparsity", "0.5", "-o", "out/sparsify-remove"]),
]
STDOUT_FILES = {"stats-show": "out/stats-show.txt"}  # commands whose stdout is an output


def build_model(path: Path) -> None:
    """A seeded 3-layer (one dense) Qwen3-MoE, 8 experts top-2, saved in 3+ shards, with a tokenizer."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=8, mlp_only_layers=[1], dtype="float32",
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # routers with varied choices, experts large enough to matter (as tests/tiny_models.py)
        for layer in model.model.layers:
            block = layer.mlp
            if not hasattr(block, "experts"):
                continue
            w = block.gate.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 1.5 / math.sqrt(config.hidden_size))
            for t in block.experts.parameters():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(path, max_shard_size=total // 4, save_original_format=True)
    if len(list(path.glob("*.safetensors"))) < 2:
        raise RuntimeError(f"{path}: expected several shards")
    save_tokenizer(path, config.vocab_size)


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level tokenizer (copied from tests/tiny_tokenizer.py), ids below vocab_size."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = (["<unk>", "<eos>"] + list(" \n\t" + string.ascii_letters + string.digits + string.punctuation))
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols[:vocab_size])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)


def write_calibration(path: Path) -> None:
    """60 documents of seeded random words, one {"text": ...} per line."""
    rng = random.Random(SEED + 11)
    words = "expert router token layer prune gate weight sparse dense mixture the a and 42 7 ( ) , ; fox dog".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))) for _ in range(60)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def scrub(value: Any) -> Any:
    """JSON value without VOLATILE_KEYS keys, at any depth."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def json_digest(value: Any) -> str:
    """sha256 of a scrubbed JSON value, re-serialised in its own key order."""
    return hashlib.sha256(json.dumps(scrub(value)).encode()).hexdigest()


def safetensors_digest(path: Path) -> str | dict[str, str]:
    """Raw sha256 for a checkpoint shard; per-tensor hashes plus scrubbed metadata for a stats file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    metadata = header.pop("__metadata__", None) or {}
    if set(metadata) <= {"format"}:
        return hashlib.sha256(raw).hexdigest()
    start = 8 + n
    out = {name: hashlib.sha256(raw[start + e["data_offsets"][0]:start + e["data_offsets"][1]]).hexdigest()
           for name, e in sorted(header.items())}
    out["__header__"] = json_digest({k: [e["dtype"], e["shape"]] for k, e in header.items()})
    out["__metadata__"] = json_digest({k: json.loads(v) if v[:1] in "{[" else v for k, v in metadata.items()})
    return out


def normalise_text(text: str, stats_sha: str) -> str:
    """Text with the statistics file's sha256 and TEXT_SUBS replaced by placeholders."""
    if stats_sha:
        text = text.replace(stats_sha, "<stats-sha256>")
    for pattern, placeholder in TEXT_SUBS:
        text = pattern.sub(placeholder, text)
    return text


def file_digest(path: Path, stats_sha: str) -> str | dict[str, str]:
    """The normalised digest of one output file (see the module docstring)."""
    if path.suffix == ".safetensors":
        return safetensors_digest(path)
    if path.suffix == ".json":
        return json_digest(json.loads(normalise_text(path.read_text(), stats_sha)))
    if path.name == "README.md" or path.suffix == ".txt":
        return hashlib.sha256(normalise_text(path.read_text(), stats_sha).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(root: Path, stats_sha: str) -> dict[str, Any]:
    """Digests of every file under root, by path relative to WORK."""
    return {str(f.relative_to(WORK)): file_digest(f, stats_sha) for f in sorted(root.rglob("*")) if f.is_file()}


def tree_env(tree: Path) -> dict[str, str]:
    """Environment whose `surgery` is the one in `tree` (checked: an editable install must not win)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""}
    probe = subprocess.run([sys.executable, "-c", "import surgery; print(surgery.__file__)"], cwd=WORK, env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0 or not Path(probe.stdout.strip()).resolve().is_relative_to(tree):
        sys.exit(f"{tree}: surgery imports from {probe.stdout.strip() or probe.stderr[-500:]}")
    return env


def run_command(env: dict[str, str], name: str, args: list[str]) -> dict[str, Any]:
    """Run one CLI command; its arguments and exit code (seconds go to stderr only)."""
    begin = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", *args], cwd=WORK, env=env,
                          capture_output=True, text=True)
    seconds = round(time.monotonic() - begin, 1)
    if name in STDOUT_FILES:
        (WORK / STDOUT_FILES[name]).write_text(proc.stdout)
    print(f"  {name}: {seconds}s, exit {proc.returncode}", file=sys.stderr)
    if proc.returncode != 0:  # recorded, so that `compare` lists it; the run goes on and exits 1 at the end
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"args": args, "returncode": proc.returncode, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"args": args, "returncode": proc.returncode}


def run(tree: Path, out: Path) -> None:
    """Build the inputs, run every command on `tree`, write the manifest to `out`."""
    tree = tree.resolve()
    if WORK.exists():
        shutil.rmtree(WORK)
    (WORK / "out").mkdir(parents=True)
    begin = time.monotonic()
    env = tree_env(tree)
    build_model(WORK / "model")
    write_calibration(WORK / "calib.jsonl")
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    commands = {name: run_command(env, name, args) for name, args in COMMANDS}
    stats_sha = hashlib.sha256((WORK / STATS).read_bytes()).hexdigest() if (WORK / STATS).exists() else ""
    outputs = tree_digests(WORK / "out", stats_sha)
    if stats_sha:
        outputs[STATS] = file_digest(WORK / STATS, stats_sha)
    manifest = {
        "tree": str(tree), "commit": commit.stdout.strip(), "normalised": NORMALISED, "commands": commands,
        "inputs": tree_digests(WORK / "model", "") | {"calib.jsonl": file_digest(WORK / "calib.jsonl", "")},
        "outputs": outputs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{out}: {len(manifest['outputs'])} output files, {time.monotonic() - begin:.1f}s", file=sys.stderr)
    failed = [name for name, c in commands.items() if c["returncode"] != 0]
    if failed:
        sys.exit(f"failed commands: {', '.join(failed)}")


def flatten(section: dict[str, Any]) -> dict[str, str]:
    """file -> digest, with per-tensor digests as 'file::tensor'."""
    flat = {}
    for name, digest in section.items():
        if isinstance(digest, dict):
            flat.update({f"{name}::{k}": v for k, v in digest.items()})
        else:
            flat[name] = digest
    return flat


def compare(a_path: Path, b_path: Path) -> int:
    """Print every differing input, output and exit code; 1 if any differ, else 0."""
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    diffs = []
    for section in ("inputs", "outputs"):
        fa, fb = flatten(a[section]), flatten(b[section])
        for key in sorted(fa.keys() | fb.keys()):
            if fa.get(key) != fb.get(key):
                diffs.append(f"{section}: {key}: {fa.get(key, '<missing>')} != {fb.get(key, '<missing>')}")
    for name in sorted(a["commands"].keys() | b["commands"].keys()):
        ca, cb = a["commands"].get(name, {}), b["commands"].get(name, {})
        if (ca.get("args"), ca.get("returncode")) != (cb.get("args"), cb.get("returncode")):
            diffs.append(f"command {name}: {ca.get('args')} rc={ca.get('returncode')} "
                         f"vs {cb.get('args')} rc={cb.get('returncode')}")
    for line in diffs:
        print(line)
    n = len(flatten(a["outputs"]))
    print(f"{len(diffs)} difference(s); {n} output digests in {a_path.name} ({a.get('commit', '?')[:9]}) "
          f"vs {b_path.name} ({b.get('commit', '?')[:9]})")
    return 1 if diffs else 0


def main() -> None:
    """Command-line entry point: `run` or `compare`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run every command on a tree, write a manifest")
    p_run.add_argument("--tree", type=Path, required=True, help="repository root whose surgery package runs")
    p_run.add_argument("--out", type=Path, required=True, help="manifest JSON to write")
    p_cmp = sub.add_parser("compare", help="compare two manifests")
    p_cmp.add_argument("a", type=Path)
    p_cmp.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.tree, args.out)
    else:
        sys.exit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
