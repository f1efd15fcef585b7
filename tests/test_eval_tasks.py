"""`eval --tasks`: lm-evaluation-harness on the model this project loads, with local tasks only (offline).

The tasks are lm-eval YAML files over JSONL the tests write: a 4-way multiple choice (which continuation
follows the passage) and a generation task scored by exact match. Their expected scores are computed here
directly from the model's logits, and the labels/targets are set so that exactly half the items are right:
a harness that scored anything else (wrong continuation tokens, wrong sign, wrong stop) would not give 0.5.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from surgery.collect.run import collect
from surgery.eval.task_report import format_tasks
from surgery.eval.tasks import TaskOptions
from surgery.hub.card_eval import model_index
from surgery.hub.model_card import card_for_push
from surgery.model.load import load_model, load_tokenizer
from surgery.pipeline.evaluate import EvalOptions, evaluate_model
from tiny_models import build_tiny
from tiny_tokenizer import save_tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm_eval comes with the [test] extra (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
WORDS = "expert router token layer prune gate weight sparse dense mixture fox dog cat".split()
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
"""
CPU = EvalOptions(device="cpu", batch_size=4)


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def loglik(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens."""
    whole = tokenizer(context + continuation)["input_ids"]
    n = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits.float().log_softmax(-1)[0]
    return sum(logp[i - 1, whole[i]].item() for i in range(n, len(whole)))


def greedy(model, tokenizer, prompt: str, steps: int = 3) -> str:
    ids = tokenizer(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True).split("\n")[0]


def write_tasks(folder: Path, model_dir: Path, n: int = 12) -> Path:
    """The two task files and their data, with labels/targets right for exactly half the items (as the
    model in `model_dir`, loaded by this project's loader, scores them)."""
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    rng = random.Random(5)
    mc, gen = [], []
    for i in range(n):
        context, choices = _phrase(rng, 5), [" " + _phrase(rng, 2) for _ in range(4)]
        scores = [loglik(model, tokenizer, context, c) for c in choices]
        pick = max if i % 2 == 0 else min  # odd items: the label is the least likely choice
        mc.append({"context": context, "choices": choices, "label": scores.index(pick(scores))})
        prompt = rng.choice(WORDS)[:4] + " " + rng.choice(WORDS)[:4]
        answer = greedy(model, tokenizer, prompt)
        gen.append({"prompt": prompt, "answer": answer if i % 2 == 0 else answer + "#"})
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    (folder / "mc.yaml").write_text(MC_YAML)
    (folder / "gen.yaml").write_text(GEN_YAML)
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def model_dir(root: Path) -> Path:
    path = build_tiny("qwen3_moe", root / "model", layout="per-expert")
    save_tiny_tokenizer(path, vocab_size=128)
    return path


@pytest.fixture(scope="module")
def tasks_dir(root: Path, model_dir: Path) -> Path:
    return write_tasks(root / "tasks", model_dir)


def scores(result: dict, run: str = "model") -> dict:
    return {t: e["metrics"] for t, e in result["tasks"][run]["results"].items()}


def test_scores_equal_direct_computation(model_dir: Path, tasks_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tasks_dir.parent)  # relative data_files are read from the YAML's folder, not the cwd
    result = evaluate_model(str(model_dir), (), CPU, tasks=TaskOptions(tasks=("tasks/mc.yaml,tasks/gen.yaml",)))
    assert scores(result) == {"tiny_mc": {"acc": 0.5}, "tiny_gen": {"exact_match": 0.5}}
    mc = result["tasks"]["model"]["results"]["tiny_mc"]
    assert mc["samples"] == 12 and mc["stderr"]["acc"] == pytest.approx((0.25 / 11) ** 0.5)
    timing = result["tasks"]["model"]["timing"]
    assert timing["request_types"] == {"loglikelihood": 48, "generate_until": 12} and timing["requests"] == 60
    assert "files" not in result  # no -d: no perplexity


def test_limit_and_folder_of_tasks(model_dir: Path, tasks_dir: Path) -> None:
    result = evaluate_model(str(model_dir), (), CPU, tasks=TaskOptions(tasks=(str(tasks_dir),), limit=4))
    assert {t: e["samples"] for t, e in result["tasks"]["model"]["results"].items()} == {"tiny_gen": 4, "tiny_mc": 4}
    assert scores(result)["tiny_mc"] == {"acc": 0.5}  # items 0-3: two right, two wrong


def test_novice_checkpoint_evaluates_through_the_loader(model_dir: Path, root: Path, cli) -> None:
    data = root / "calib.jsonl"
    rng = random.Random(2)
    data.write_text("".join(json.dumps({"text": _phrase(rng, 12)}) + "\n" for _ in range(20)))
    stats = root / "stats.safetensors"
    collect(model_dir, [str(data)], stats, samples=4, seq_len=24, holdout=0, batch_size=2, seed=3, progress=False)
    novices = root / "novices"
    r = cli("prune", model_dir, "--stats", stats, "--criterion", "frequency", "--ratio", "0.5", "--novices", "-o", novices)
    assert r.exit_code == 0, r.output
    tasks = write_tasks(root / "novice-tasks", novices, n=6)  # labels from the novice model as surgery loads it
    result = evaluate_model(str(novices), (), CPU, tasks=TaskOptions(tasks=(str(tasks / "mc.yaml"),)))
    assert scores(result) == {"tiny_mc": {"acc": 0.5}}


def test_reference_gives_both_columns_and_perplexity(model_dir: Path, tasks_dir: Path, root: Path, cli) -> None:
    other = build_tiny("qwen3_moe", root / "other", layout="per-expert", seed=1)
    save_tiny_tokenizer(other, vocab_size=128)
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": _phrase(random.Random(i), 30)}) + "\n" for i in range(8)))
    j = cli("eval", model_dir, "--tasks", tasks_dir / "mc.yaml", "--reference", other, "-d", data, "--seq-len", "64",
            "--max-tokens", "256", "--device", "cpu", "--json")
    assert j.exit_code == 0, j.output
    result = json.loads(j.stdout)
    assert result["kl"] > 0 and result["files"][0]["ppl"] > 1  # the perplexity/KL report is there too
    ref_model, ref_tok = load_model(other), load_tokenizer(other)
    items = [json.loads(line) for line in (tasks_dir / "mc.jsonl").read_text().splitlines()]
    ref_right = [max(range(4), key=lambda k: loglik(ref_model, ref_tok, d["context"], d["choices"][k])) == d["label"]
                 for d in items]
    assert scores(result) == {"tiny_mc": {"acc": 0.5}}
    assert scores(result, "reference") == {"tiny_mc": {"acc": pytest.approx(sum(ref_right) / len(items))}}
    table = format_tasks(result["tasks"]).splitlines()  # what `eval` prints without --json
    assert table[0].split() == ["task", "metric", "model", "±stderr", "reference", "±stderr", "delta"]
    row = table[1].split()
    assert row[:3] == ["tiny_mc", "acc", "0.5000"]
    assert float(row[6]) == pytest.approx(0.5 - scores(result, "reference")["tiny_mc"]["acc"], abs=1e-4)
    assert float(row[4]) == pytest.approx(scores(result, "reference")["tiny_mc"]["acc"], abs=1e-4)


def one_line_error(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("fatal:", "Generating"))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_missing_extra_is_one_line(model_dir: Path, tasks_dir: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    line = one_line_error(cli("eval", model_dir, "--tasks", tasks_dir / "mc.yaml", "--device", "cpu"))
    assert "pip install 'moe-surgery[eval]'" in line


def test_unknown_tasks_are_one_line(model_dir: Path, tasks_dir: Path, root: Path, cli) -> None:
    assert "no such task file" in one_line_error(cli("eval", model_dir, "--tasks", root / "missing.yaml"))
    bad = root / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    assert "no `task:` name" in one_line_error(cli("eval", model_dir, "--tasks", bad))
    (root / "nodata.yaml").write_text(MC_YAML.replace("mc.jsonl", "gone.jsonl"))
    assert f"data file {root / 'gone.jsonl'} not found" in one_line_error(cli("eval", model_dir, "--tasks", root / "nodata.yaml"))
    line = one_line_error(cli("eval", model_dir, "--tasks", "no_such_task_xyz"))
    assert "unknown task 'no_such_task_xyz'" in line
    assert "nothing to evaluate" in one_line_error(cli("eval", model_dir))


def test_offline_and_writes_nothing_outside(model_dir: Path, tasks_dir: Path, tmp_path: Path) -> None:
    """A fresh process with the Hub unreachable by configuration, its home, caches and cwd empty folders:
    the run succeeds and leaves them empty (the datasets cache of local tasks is a removed temporary)."""
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir()
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / "cache"),
           "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    before = sorted(p.name for p in tasks_dir.iterdir())
    r = subprocess.run([sys.executable, "-m", "surgery.cli", "eval", str(model_dir), "--tasks", str(tasks_dir),
                        "--limit", "2", "--device", "cpu", "--json"], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not a git repository" not in r.stderr  # lm-eval's `git describe` of a cwd outside a repository
    assert scores(json.loads(r.stdout)) == {"tiny_gen": {"exact_match": 0.5}, "tiny_mc": {"acc": 0.5}}
    assert not any(home.rglob("*")) and not any(cwd.rglob("*")) and not any(tmp.rglob("*"))
    assert sorted(p.name for p in tasks_dir.iterdir()) == before


def test_model_index_is_what_huggingface_hub_writes() -> None:
    tasks = {"model": {"results": {"arc_easy": {"metrics": {"acc": 0.5, "acc_norm": 0.25}, "stderr": {},
                                                "num_fewshot": 0}}}}
    index = model_index("pruned", tasks)
    expected = ModelCardData(model_name="pruned", eval_results=[
        EvalResult(task_type="text-generation", dataset_type="arc_easy", dataset_name="arc_easy", metric_type=m,
                   metric_value=v, metric_name=m, dataset_args={"num_few_shot": 0})
        for m, v in (("acc", 0.5), ("acc_norm", 0.25))]).to_dict()["model-index"]
    assert index == expected
    name, results = model_index_to_eval_results(index)
    assert name == "pruned" and [(e.metric_type, e.metric_value) for e in results] == [("acc", 0.5), ("acc_norm", 0.25)]


def test_eval_results_go_into_the_card(model_dir: Path, tasks_dir: Path, root: Path, cli) -> None:
    pruned = root / "pruned"
    r = cli("prune", model_dir, "--criterion", "weight_norm", "--ratio", "0.25", "-o", pruned)
    assert r.exit_code == 0, r.output
    j = cli("eval", pruned, "--tasks", tasks_dir / "mc.yaml", "--device", "cpu", "--json")
    assert j.exit_code == 0, j.output
    results = root / "results.json"
    results.write_text(j.stdout)
    card_before = (pruned / "README.md").read_text()  # eval already put them into the local card
    assert "model-index" in card_before and "| tiny_mc | acc | 0.5000 |" in card_before
    r = cli("prune", model_dir, "--criterion", "weight_norm", "--ratio", "0.25", "-o", pruned, "--overwrite",
            "--eval-results", results)
    assert r.exit_code == 0, r.output
    card = (pruned / "README.md").read_text()
    meta = ModelCardData(**__import__("yaml").safe_load(card.split("---\n")[1]))
    assert meta.eval_results[0].dataset_name == "tiny_mc" and meta.eval_results[0].metric_value == 0.5
    assert card_for_push(pruned, json.loads(results.read_text())) == card
    (root / "bad.json").write_text('{"tasks": {"model": {"results": {"t": {"metrics": {"acc": "high"}}}}}}')
    line = one_line_error(cli("prune", model_dir, "--criterion", "weight_norm", "--ratio", "0.25", "-o",
                              root / "never", "--eval-results", root / "bad.json"))
    assert "bad.json: malformed" in line and not (root / "never").exists()


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: keeps the bytes of the one commit."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def create_repo(self, *args, **kwargs) -> None:
        """The repository exists for this fake: nothing to record."""

    def create_commit(self, repo_id: str, operations, **kwargs):
        from types import SimpleNamespace

        for op in operations:
            src = op.path_or_fileobj
            self.files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'f' * 40}")


def test_push_uploads_the_card_with_results(model_dir: Path, root: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.hub.client as hub

    folder = root / "to-push"
    assert cli("prune", model_dir, "--criterion", "weight_norm", "--ratio", "0.5", "-o", folder).exit_code == 0
    results = root / "push-results.json"
    results.write_text(json.dumps({"tasks": {"model": {"results": {"arc_easy": {
        "metrics": {"acc": 0.625}, "stderr": {"acc": 0.01}, "num_fewshot": 0}}}}}))
    api = RecordingApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    before = (folder / "README.md").read_bytes()
    r = cli("push", folder, "me/pruned", "--eval-results", results)
    assert r.exit_code == 0, r.output
    card = api.files["README.md"].decode()
    assert "| arc_easy | acc | 0.6250 | 0.0100 |" in card and "model-index" in card
    assert (folder / "README.md").read_bytes() == before  # the local folder is not modified
    (folder / "README.md").write_text(before.decode() + "\nmy own notes\n")
    line = one_line_error(cli("push", folder, "me/pruned", "--eval-results", results))
    assert "not a model card moe-surgery wrote" in line
