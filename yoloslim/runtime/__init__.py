"""The device runtime: preprocessing, postprocessing and inference backends. No torch or ultralytics import here
(the base install runs it on a Jetson); TensorRT and CUDA bindings are imported lazily, each in one module."""
