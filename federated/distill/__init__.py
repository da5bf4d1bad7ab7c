"""``tandem distill``: DistillSpec drafters with a reduced-vocabulary head for Hugging Face targets."""
