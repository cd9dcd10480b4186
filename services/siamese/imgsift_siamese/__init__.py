"""imgsift siamese stage: embed crops, measure their distance to the job's reference images."""
