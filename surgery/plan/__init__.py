"""scores → plan: the typed Plan (document), the constraints it must meet on a model, and selection from scores."""

from surgery.plan.document import Plan, read_plan_for

__all__ = ["Plan", "read_plan_for"]
