"""sftdist: supervised fine-tuning of causal language models, from one CPU to a slurm cluster."""

__version__ = "0.1.0"
