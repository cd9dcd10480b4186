"""What every imgsift service shares: messages, settings, Celery routing, storage, job state."""
