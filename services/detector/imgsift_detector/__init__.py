"""imgsift detector: YOLO finds the job's target objects in stored images; padded crops go to the Siamese stage."""
