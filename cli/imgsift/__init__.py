"""imgsift command line and embedded runner."""
