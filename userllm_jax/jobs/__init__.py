"""Jobs run by ``python -m userllm_jax.main``: ``config.job`` -> module with ``run(config, workdir)``."""

JOBS = {
    "encoder": "userllm_jax.jobs.encoder_job",
    "userllm": "userllm_jax.jobs.userllm_job",
}
