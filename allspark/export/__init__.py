"""allspark.export: a checkpoint to a build of ONNX graphs, each checked against PyTorch (`build`, `verify`)."""
