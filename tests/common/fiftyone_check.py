"""Read an imgsift ``fiftyone`` export with FiftyOne's own importer; print {crop_id: [label, distance, accepted]}.

Run by test_exports_training with an interpreter that has fiftyone (it may not be this venv's: FiftyOne
brings a MongoDB). The importer parses the folder without a database, as ``Dataset.from_dir`` does first.
"""

import json
import sys

import fiftyone.utils.data as foud  # type: ignore[import-not-found]

found = {}
importer = foud.FiftyOneImageDetectionDatasetImporter(dataset_dir=sys.argv[1])
with importer:
    for _path, _metadata, label in importer:
        for detection in label.detections:
            found[detection["crop_id"]] = [detection.label, detection["distance"], detection["accepted"]]
print(json.dumps(found))
