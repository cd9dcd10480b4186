"""imgsift API service (FastAPI)."""
