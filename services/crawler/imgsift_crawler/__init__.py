"""imgsift crawler: sources find candidate image URLs; downloads are validated, deduplicated and stored."""
