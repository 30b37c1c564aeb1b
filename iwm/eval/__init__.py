"""Evaluations: world-model MRR, linear probe, predictor finetuning (see each module)."""
