"""emrrg.export: LoRA merge, ONNX export, quantization, engine build, bundle writer, validation."""
