"""yoloslim: slim YOLO detectors (Ultralytics YOLOv5u, YOLOv8, YOLO11, YOLO26; classic YOLOv5) for edge devices."""

__version__ = "0.1.0"
