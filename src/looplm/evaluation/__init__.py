"""Evaluation: benchmark tasks read from local files (`looplm.evaluation.tasks`)."""
