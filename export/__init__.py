"""ONNX export of the three IP-IQA graphs (image encoder, [QA] text encoder, fusion) and TensorRT engines."""
