"""yoloslim: slim Ultralytics YOLOv5 detectors for edge devices."""

__version__ = "0.1.0"
