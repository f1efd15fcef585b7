"""Build a multiple-choice task (lm-evaluation-harness YAML + JSONL) from a folder of text domains (issue 24).

Each item is a passage from one document, its true continuation, and three continuations of the same
length taken from OTHER documents of the same domain (so the style matches and only the content tells
them apart), in a random order. Lengths are in whitespace-separated pieces, so the task does not depend
on a tokenizer; every choice starts with the true continuation's leading whitespace (no spacing cue).
One task per domain (`mc_<domain>`), its YAML and JSONL side by side, data files given relative to
the YAML (read from its folder by `moe-surgery eval --tasks FOLDER`).

  python bench/mc_task.py --data ../shared/data/eval --out bench/work/mc-task [--items 500 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

YAML = """task: mc_{domain}
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc_{domain}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def pieces(text: str) -> list[str]:
    """Whitespace-led words: joining a run of them gives the original text back."""
    return re.findall(r"\s*\S+", text)


def build_domain(docs: list[list[str]], items: int, context: int, length: int, rng: random.Random) -> list[dict]:
    """`items` questions over one domain's documents (each a list of pieces)."""
    usable = [i for i, d in enumerate(docs) if len(d) >= context + length]
    if not usable:
        raise SystemExit(f"no document has {context + length} pieces")
    weights = [len(docs[i]) - context - length + 1 for i in usable]
    out = []
    while len(out) < items:
        d = rng.choices(usable, weights)[0]
        start = rng.randrange(context, len(docs[d]) - length + 1)
        true = "".join(docs[d][start:start + length])
        lead = true[: len(true) - len(true.lstrip())]
        others = [i for i in range(len(docs)) if i != d and len(docs[i]) >= length] or [d]
        choices = [true]
        while len(choices) < 4:
            o = rng.choice(others)
            s = rng.randrange(0, len(docs[o]) - length + 1)
            if o == d and abs(s - start) < context + length:  # one-document domain: far from the passage
                continue
            candidate = lead + "".join(docs[o][s:s + length]).lstrip()
            if candidate not in choices:
                choices.append(candidate)
        order = list(range(4))
        rng.shuffle(order)
        out.append({"context": "".join(docs[d][start - context:start]).lstrip(),
                    "choices": [choices[k] for k in order], "label": order.index(0), "doc": d, "start": start})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of .jsonl files (a `text` field per line), one per domain")
    p.add_argument("--out", required=True, type=Path, help="folder for the YAML and JSONL files")
    p.add_argument("--items", type=int, default=500, help="items per domain")
    p.add_argument("--context", type=int, default=64, help="pieces of passage before the continuation")
    p.add_argument("--length", type=int, default=16, help="pieces per continuation")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(args.data).glob("*.jsonl")):
        docs = [pieces(json.loads(line)["text"]) for line in path.read_text().splitlines() if line.strip()]
        domain = re.sub(r"\W", "_", path.stem)
        rng = random.Random(f"{args.seed}:{domain}")
        items = build_domain(docs, args.items, args.context, args.length, rng)
        (args.out / f"mc_{domain}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        (args.out / f"mc_{domain}.yaml").write_text(YAML.format(domain=domain))
        print(f"mc_{domain}: {len(items)} items from {len(docs)} documents")


if __name__ == "__main__":
    main()
