"""The worker service: a Celery worker that runs registered task functions and records their outcomes."""
