"""Fine-tuning: the built-in tasks, labeled examples, objectives, methods and inference."""
