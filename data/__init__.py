"""Datasets: `python -m data.fetch` downloads them into data/datasets/ (git-ignored); see its docstring."""
