"""What the trainer and the merger both need, and neither owns: loading and verifying a base
model, the classifier heads around it, evaluation metrics, tiny models and images for tests and
the demo. Uses torch; imports neither image's package, nor the operator's."""
