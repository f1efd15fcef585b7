"""The public Python API the CLI and the bench scripts call; each module is one command's orchestration.

- `score`: ScoreOptions, score_plan (scores → a surgery.plan.Plan), load_source + build_plan (its halves)
- `prune`: prune (the whole `prune` command), prune_rounds (`-d DATA [--rounds N]`), RoundsOptions,
  WriteOptions, PushOptions, between_rounds_healer
- `rounds`: the rounds themselves (iterative and progressive)
- `sparsify`: sparsify (expert removal first when asked), SparsifyOptions
- `evaluate`: evaluate_model, EvalOptions
- `demo`: run_demo and the built-in model

Collect options are `surgery.collect.options.CollectOptions`; collecting is `surgery.collect.run.collect`.
"""
