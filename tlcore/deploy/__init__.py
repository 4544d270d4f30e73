"""A finished run put to use: loading and predicting, exports (Keras, SavedModel, TFLite, ONNX,
bundle), the HTTP endpoint, and the model registry whose reviews gate what reaches production."""
