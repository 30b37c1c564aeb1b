"""Evaluations: world-model MRR, linear probe, predictor finetuning (see each module)."""

# The evaluations `eval.tasks` may name (iwm.eval.runner runs them; iwm.config validates against this).
TASKS = ("mrr", "linear", "predictor")
