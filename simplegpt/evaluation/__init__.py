"""Scoring a model, one job per module:

    perplexity       loss, perplexity and bits per byte on a text, in sliding windows (`simplegpt eval`)
    lm_eval_harness  a checkpoint as the model "simplegpt" of EleutherAI's lm-evaluation-harness
                     (`python -m simplegpt.evaluation.lm_eval_harness run ...`; needs the lmeval extra)
"""
