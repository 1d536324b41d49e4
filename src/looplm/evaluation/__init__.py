"""Evaluation integrations. Nothing here is imported by `import looplm`.

`looplm.evaluation.lm_eval_adapter`: the lm-evaluation-harness model "looplm" (needs `pip install looplm[eval]`).
"""
