"""Healing a pruned student by distillation from the checkpoint it was cut from (`moe-surgery heal`)."""
