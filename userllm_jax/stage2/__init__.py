"""User-LLM stage 2: examples, the stage-2 loss, methods, evaluation, baselines and the report.

``jobs/userllm_job.py`` orders the stages; the work lives here (see README.md, "Stage 2").
"""
