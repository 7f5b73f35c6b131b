"""`python -m inference_app --demo`: the app on a random-weight model built on first use (random_model), which the
tests and benchmarks use too."""
