"""What a bundle is and how its models run: the contract (models by role), the bundle
(manifest, hashes, signature), tokenizers, engines (ONNX Runtime, TensorRT), the plan and
its bounds, and the bundle this robot may run. No process, no socket."""
