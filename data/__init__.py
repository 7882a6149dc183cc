"""Datasets: `data/fetch.py` downloads them into data/datasets/ (git-ignored); see its docstring."""
